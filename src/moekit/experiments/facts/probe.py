"""Learning curves of experiment (g)'s models: value CE on the trained facts every N steps.

    python -m moekit.experiments.facts.probe --model moe-e16 --facts 1000 --seed 1

Research code for choosing (g)'s recipe (docs/facts.md, "The recipe"): where ``moekit compare``
only sees the trained model, this shows when a model leaves the plateau where nothing is stored
(value CE ≈ ln 26 = 3.258). With the defaults it trains exactly the grid's run of that model,
facts and seed (``run.train_config``: the same text, seed, batches and schedule, moekit's
``Trainer`` and optimizer), on a temporary copy of the text, and evaluates it every
``--every`` steps; the flags change one setting at a time. Prints one line per evaluation:
step, value CE, exact match and held-out CE.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from moekit.experiments.facts.data import ALPHABET, _letters, facts_text, make_facts, pass_orders, value_metrics
from moekit.experiments.facts.run import FactsConfig, models, train_config
from moekit.layer import MoE
from moekit.models.lm import MoETransformerLM
from moekit.training.config import TrainConfig
from moekit.training.data import ByteTokenizer, TextDataset
from moekit.training.trainer import StopSignals, Trainer, TrainState


def noisy_facts_text(facts, passes: int, seed: int, noise: float) -> str:  # type: ignore[no-untyped-def]
    """Each pass of the trained facts mixed with ``noise`` × as many lines of fresh random keys
    and values (never a trained or held-out key), to teach that an unknown key has no known value."""
    rng = random.Random(99 + seed)
    used = set(facts.keys) | set(facts.heldout_keys)
    lines = facts.lines()
    chunks = []
    for order in pass_orders(len(lines), passes, seed):
        fresh: list[str] = []
        while len(fresh) < int(noise * len(lines)):
            key = _letters(rng.randrange(len(ALPHABET) ** facts.key_len), facts.key_len)
            if key not in used:
                fresh.append(key + ":" + "".join(rng.choice(ALPHABET) for _ in range(facts.value_len)) + "\n")
        mixed = [lines[i] for i in order] + fresh
        rng.shuffle(mixed)
        chunks.append("".join(mixed))
    return "".join(chunks)


def main(argv: list[str] | None = None) -> list[tuple[int, float, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="moe-e16", help="dense, moe-e4, moe-e8, moe-e16, moe-e32 or dense-wide")
    parser.add_argument("--facts", type=int, default=1000)
    parser.add_argument("--key-len", type=int, default=4)
    parser.add_argument("--steps", type=int, default=FactsConfig.steps)
    parser.add_argument("--every", type=int, default=500, help="steps between evaluations")
    parser.add_argument("--lr", type=float, default=FactsConfig.lr)
    parser.add_argument("--batch", type=int, default=FactsConfig.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--balance", type=float, default=FactsConfig.balance_loss_coef,
                        help="balance loss coefficient")
    parser.add_argument("--z-loss", type=float, default=FactsConfig.z_loss_coef)
    parser.add_argument("--scale", type=float, default=FactsConfig.routed_scaling_factor,
                        help="routed_scaling_factor of the MoEs")
    parser.add_argument("--noise", type=float, default=0.0, help="fresh random lines per trained fact and pass")
    parser.add_argument("--layers", type=int, default=FactsConfig.n_layer, help="transformer blocks")
    parser.add_argument("--moe-every", type=int, default=FactsConfig.moe_every,
                        help="every n-th block's FFN is the MoE (LMConfig.moe_every)")
    parser.add_argument("--heads", type=int, default=FactsConfig.n_head)
    parser.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay,
                        help="AdamW weight decay of the matrices (the router's excepted, as in moekit train)")
    parser.add_argument("--beta2", type=float, default=TrainConfig.beta2, help="AdamW beta2")
    parser.add_argument("--router-std", type=float, default=None,
                        help="re-draw the routers' weights from N(0, std²) (the LM's init: 0.02)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = replace(FactsConfig(), balance_loss_coef=args.balance, z_loss_coef=args.z_loss,
                     routed_scaling_factor=args.scale, n_layer=args.layers, moe_every=args.moe_every,
                     n_head=args.heads, batch_size=args.batch, lr=args.lr, steps=args.steps)
    model_config = models(config)[args.model]
    facts = make_facts(args.facts, args.key_len, config.value_len, config.heldout, args.seed)
    text = (noisy_facts_text(facts, config.passes, args.seed, args.noise) if args.noise > 0
            else facts_text(facts, config.passes, args.seed))
    curve: list[tuple[int, float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="moekit-probe-") as scratch:
        path = Path(scratch) / "facts.txt"
        path.write_text(text)
        # The grid's own run (train_config: seed, batches, schedule), trained by moekit's
        # trainer, with a log row (and here an evaluation) every ``--every`` steps.
        train = replace(train_config(config, path, args.seed), weight_decay=args.weight_decay, beta2=args.beta2,
                        log_interval=args.every, eval_interval=args.every, checkpoint_interval=10**9)
        torch.manual_seed(train.seed)
        model = MoETransformerLM(model_config)
        if args.router_std is not None:
            for module in model.modules():
                if isinstance(module, MoE):
                    torch.nn.init.normal_(module.router.weight, std=args.router_std)
        dataset = TextDataset.load(str(path), model_config.seq_len, ByteTokenizer())
        state = TrainState(sampler=torch.Generator().manual_seed(train.seed), total_steps=train.steps)
        started = time.time()

        def evaluate_facts(step: int, row: dict) -> None:
            if step % args.every and step != train.steps:
                return
            model.eval()
            trained = value_metrics(model, facts.keys, facts.values, config.eval_batch_size)
            heldout = value_metrics(model, facts.heldout_keys, facts.heldout_values, config.eval_batch_size)
            model.train()
            curve.append((step, trained.value_ce, trained.exact_match, heldout.value_ce))
            print(f"{args.model} step {step}: value CE {trained.value_ce:.3f}, exact match {trained.exact_match:.3f}, "
                  f"held-out CE {heldout.value_ce:.2f} ({time.time() - started:.0f} s)", flush=True)

        trainer = Trainer(model, train, dataset, Path(scratch) / "run", state, StopSignals(), progress=False,
                          on_step=evaluate_facts)
        trainer._bar = None  # fit() sets it; train_step's log reads it
        model.train()
        while state.step < train.steps:
            trainer.train_step()
    return curve


if __name__ == "__main__":
    main()
