"""Learning curves of experiment (g)'s models: value CE on the trained facts every N steps.

    python -m moekit.experiments.facts.probe --model moe-e16 --facts 1000 --steps 4000 \\
        --scale 2 --balance 0 --z-loss 0

Research code for choosing (g)'s recipe (docs/facts.md, "The recipe"): where ``moekit compare``
only sees the trained model, this shows when a model leaves the plateau where nothing is stored
(value CE ≈ ln 26 = 3.258). It uses its own minimal loop, not moekit's trainer: AdamW (0.9,
0.95), weight decay 0.1 on every matrix (the router's included), gradient clipping at 1, the
linear warm-up of 100 steps and a cosine decay to 10% of ``--lr``; random windows of the same
facts text (100 shuffled passes) as the grid. Prints one line per evaluation: step, value CE,
exact match and held-out CE.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from moekit.experiments.facts.data import ALPHABET, _letters, facts_text, make_facts, pass_orders, value_metrics
from moekit.experiments.facts.run import FactsConfig, models
from moekit.layer import MoE, aux_loss
from moekit.models.lm import MoETransformerLM


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
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--every", type=int, default=500, help="steps between evaluations")
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--balance", type=float, default=0.02, help="balance loss coefficient")
    parser.add_argument("--z-loss", type=float, default=1e-3)
    parser.add_argument("--scale", type=float, default=1.0, help="routed_scaling_factor of the MoEs")
    parser.add_argument("--noise", type=float, default=0.0, help="fresh random lines per trained fact and pass")
    parser.add_argument("--layers", type=int, default=FactsConfig.n_layer, help="transformer blocks")
    parser.add_argument("--moe-every", type=int, default=FactsConfig.moe_every,
                        help="every n-th block's FFN is the MoE (LMConfig.moe_every)")
    parser.add_argument("--heads", type=int, default=FactsConfig.n_head)
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the matrices")
    parser.add_argument("--router-std", type=float, default=None,
                        help="re-draw the routers' weights from N(0, std²) (the LM's init: 0.02)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = replace(FactsConfig(), balance_loss_coef=args.balance, z_loss_coef=args.z_loss,
                     routed_scaling_factor=args.scale, n_layer=args.layers, moe_every=args.moe_every,
                     n_head=args.heads)
    model_config = models(config)[args.model]
    facts = make_facts(args.facts, args.key_len, config.value_len, config.heldout, args.seed)
    text = (noisy_facts_text(facts, config.passes, args.seed, args.noise) if args.noise > 0
            else facts_text(facts, config.passes, args.seed))
    tokens = torch.tensor(list(text.encode()), dtype=torch.long)
    torch.manual_seed(1000 + args.seed)
    model = MoETransformerLM(model_config)
    if args.router_std is not None:
        for module in model.modules():
            if isinstance(module, MoE):
                torch.nn.init.normal_(module.router.weight, std=args.router_std)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": args.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    sampler = torch.Generator().manual_seed(args.seed)
    seq_len = model_config.seq_len
    started, curve = time.time(), []
    for step in range(1, args.steps + 1):
        # Warm-up, then cosine decay to 10% of lr.
        lr = args.lr * min(1.0, step / 100) * (0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps))) * 0.9 + 0.1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(len(tokens) - seq_len - 1, (args.batch,), generator=sampler)
        inputs = torch.stack([tokens[i : i + seq_len] for i in starts])
        targets = torch.stack([tokens[i + 1 : i + seq_len + 1] for i in starts])
        model.train()
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)) + aux_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            model.eval()
            trained = value_metrics(model, facts.keys, facts.values, 512)
            heldout = value_metrics(model, facts.heldout_keys, facts.heldout_values, 512)
            curve.append((step, trained.value_ce, trained.exact_match, heldout.value_ce))
            print(f"{args.model} step {step}: value CE {trained.value_ce:.3f}, exact match {trained.exact_match:.3f}, "
                  f"held-out CE {heldout.value_ce:.2f} ({time.time() - started:.0f} s)", flush=True)
    return curve


if __name__ == "__main__":
    main()
