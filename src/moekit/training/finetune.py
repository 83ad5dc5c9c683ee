"""Fine-tune an MoE language model, and turn a dense one into an MoE (sparse upcycling).

    moekit finetune --from runs/my --data new.txt --out runs/ft --freeze non-experts
    moekit finetune --from hf/mixtral-tiny --data new.txt --out runs/ft --expert-dropout 0.2 --seq-len 256
    moekit upcycle runs/dense --out runs/upcycled --experts 8 --top-k 2

Sparse models overfit easily when fine-tuned (Switch Transformers, Fedus et al. 2021, §2.4;
ST-MoE, Zoph et al. 2022, §4): so the auxiliary losses stay on, ``--expert-dropout`` raises
dropout inside the experts only (Switch's "expert dropout"), ``--freeze`` trains a subset of
the parameters (ST-MoE found that updating only the non-MoE parameters fine-tunes about as
well as updating all of them, and updating only the experts worse), and the run stops
when the validation loss has not improved for ``patience`` evaluations, keeping the best
weights. The source is a moekit run directory or a local Hugging Face Mixtral folder; the
output is a run directory that ``moekit sample`` reads.

Sparse upcycling (Komatsuzaki et al. 2022): every expert starts as a copy of the dense FFN
and the router starts small. With the top-k weights renormalized to sum to 1 and no token
dropped, the MoE layer computes Σ_j w_j·FFN(x) = FFN(x), so the upcycled model's output
equals the dense model's at initialization, whatever the router says.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from moekit.config import MoEConfig
from moekit.experts import DenseFFN
from moekit.layer import MoE
from moekit.models.lm import LMConfig, MoETransformerLM
from moekit.training.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    claim_new_run,
    load_model_from_run,
    read_run_config,
    save_checkpoint,
    write_json_atomic,
    write_metrics_csv,
)
from moekit.training.config import TrainConfig
from moekit.training.data import ByteTokenizer, TextDataset, tokenizer_from_dict
from moekit.training.trainer import StopSignals, Trainer, TrainState

FREEZE_MODES = ("none", "router", "experts", "non-experts")


def is_expert_param(name: str) -> bool:
    """Routed and shared expert FFN weights (not the router)."""
    return ".experts." in name or ".shared_experts." in name


def is_router_param(name: str) -> bool:
    return ".router." in name


def freeze(model: torch.nn.Module, mode: str) -> tuple[int, int]:
    """Set requires_grad by ``mode``; returns (trainable, frozen) parameter counts.

    none: train everything; router: freeze the routers (keep the learned routing);
    experts: freeze routed and shared experts (train attention, embeddings, norms, routers);
    non-experts: train only the experts.
    """
    if mode not in FREEZE_MODES:
        raise ValueError(f"freeze={mode!r} is invalid: must be one of {FREEZE_MODES}")
    trainable = frozen = 0
    for name, param in model.named_parameters():
        if mode == "router":
            train = not is_router_param(name)
        elif mode == "experts":
            train = not is_expert_param(name)
        elif mode == "non-experts":
            train = is_expert_param(name)
        else:
            train = True
        param.requires_grad_(train)
        if train:
            trainable += param.numel()
        else:
            frozen += param.numel()
    if trainable == 0:
        raise ValueError(f"freeze={mode!r} leaves no trainable parameters in this model")
    if mode != "none" and frozen == 0:
        raise ValueError(f"freeze={mode!r} freezes nothing: this model has no {mode.replace('non-', '')} parameters")
    return trainable, frozen


@dataclass
class FinetuneResult:
    run_dir: str
    source: str
    freeze: str
    expert_dropout: float
    val_loss_before: float
    val_loss_after: float  # of the best weights, which the run keeps
    best_step: int
    steps: int
    stopped_early: bool
    trainable_params: int
    frozen_params: int
    train_seconds: float
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class KeepBest:
    """Early stopping (the trainer's ``on_eval`` hook): keeps the weights of the lowest
    validation loss, and asks to stop after ``patience`` evaluations without improvement."""

    def __init__(self, model: torch.nn.Module, val_loss: float, patience: int) -> None:
        self.model, self.patience = model, patience
        self.val_loss, self.step, self.bad_evals = val_loss, 0, 0
        self.state = copy.deepcopy(model.state_dict())

    def __call__(self, step: int, val_loss: float) -> bool:
        if val_loss < self.val_loss:
            self.val_loss, self.step, self.bad_evals = val_loss, step, 0
            self.state = copy.deepcopy(self.model.state_dict())
            return False
        self.bad_evals += 1
        return self.bad_evals >= self.patience


def finetune(
    source: str | Path,
    data: str | Path,
    out: str | Path,
    freeze_mode: str = "none",
    expert_dropout: float = 0.0,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 16,
    seq_len: int | None = None,
    eval_interval: int = 25,
    eval_batches_count: int = 8,
    patience: int = 3,
    seed: int = 0,
    progress: bool = True,
    loader: Callable[[Path], tuple[MoETransformerLM, dict]] = load_model_from_run,
) -> FinetuneResult:
    """Fine-tune the model of ``source`` on the text file ``data``; writes the run to ``out``.

    The trainer's loop with a freeze plan and an early-stopping hook: the run keeps the best
    weights, also when it is interrupted (Ctrl-C, SIGTERM). ``loader`` reads the source: a
    moekit run directory by default; ``moekit.interop.hf.load_run_or_hf_folder`` also reads
    local Hugging Face folders.
    """
    out = Path(out)
    if patience < 1:
        raise ValueError(f"patience={patience} is invalid: must be >= 1")
    train_config = TrainConfig(
        data=str(Path(data).resolve()), steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(20, steps // 10),
        eval_interval=eval_interval, eval_batches=eval_batches_count, seed=seed, max_minutes=None, device="cpu",
    )
    train_config.validate()
    with claim_new_run(out), StopSignals() as stop:
        source_model, payload = loader(Path(source))
        config = source_model.config
        moe = replace(config.moe, expert_dropout=expert_dropout)  # validates the value
        config = LMConfig.from_dict({**config.to_dict(), "moe": moe.to_dict(), "seq_len": seq_len or config.seq_len})
        torch.manual_seed(seed)
        model = MoETransformerLM(config)  # NOTE: rebuilt so its expert dropout modules use the new rate
        model.load_state_dict(source_model.state_dict())
        del source_model
        trainable, frozen = freeze(model, freeze_mode)
        tokenizer = tokenizer_from_dict(payload.get("tokenizer", {"kind": "bytes"}))
        if tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"tokenizer vocabulary {tokenizer.vocab_size} != model vocab_size {config.vocab_size}")
        dataset = TextDataset.load(data, config.seq_len, tokenizer)
        write_json_atomic(
            out / CONFIG_FILE,
            {"model": config.to_dict(), "train": asdict(train_config), "tokenizer": tokenizer.to_dict()},
        )
        state = TrainState(sampler=torch.Generator().manual_seed(seed), total_steps=steps)
        trainer = Trainer(model, train_config, dataset, out, state, stop, progress=progress,
                          desc=f"finetune ({freeze_mode})", save_periodically=False)
        best = KeepBest(model, trainer.evaluate(), patience)
        before = best.val_loss
        trainer.on_eval = best
        stopped_by = trainer.fit()
        model.load_state_dict(best.state)  # early stopping keeps the best weights
        result = FinetuneResult(
            run_dir=str(out), source=str(source), freeze=freeze_mode, expert_dropout=expert_dropout,
            val_loss_before=before, val_loss_after=best.val_loss, best_step=best.step, steps=state.step,
            stopped_early=stopped_by == "early_stop", trainable_params=trainable, frozen_params=frozen,
            train_seconds=state.train_seconds, interrupted=stopped_by == "interrupt",
        )
        with stop.deferred():
            save_checkpoint(out, model, {"finetune": result.to_dict()})
            write_metrics_csv(out, state.history)
            write_json_atomic(out / "results.json", result.to_dict())
    return result


# ---------------------------------------------------------------------------------------
# Sparse upcycling
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def upcycle_model(
    dense: MoETransformerLM, num_experts: int, top_k: int, moe_every: int = 1, router_std: float = 1e-3,
    seed: int = 0,
) -> MoETransformerLM:
    """The sparse upcycling of a dense moekit LM: every expert a copy of the layer's dense FFN,
    routers N(0, router_std), top-k weights renormalized, dropless."""
    config = dense.config
    if config.arch != "dense":
        raise ValueError(f"upcycle needs a dense model (arch='dense'), got arch={config.arch!r}")
    widths = {config.ffn_width(i) for i in range(config.n_layer)}
    if len(widths) != 1:
        raise ValueError(f"upcycle needs one FFN width in every layer, got {sorted(widths)}")
    width = widths.pop()
    # NOTE: exact equality at init needs weights summing to 1 (normalize_weights, topk router)
    # and no capacity drops (dropless); the losses keep the dense run's coefficients.
    moe = MoEConfig(**{
        **config.moe.to_dict(), "d_ff": width, "num_experts": num_experts, "top_k": top_k, "router": "topk",
        "normalize_weights": True, "capacity_factor": None, "eval_capacity_factor": None, "expert_capacity": None,
        "routing_group": "batch", "num_shared_experts": 0, "shared_expert_d_ff": None, "shared_expert_gate": False,
        "n_group": 1, "topk_group": 1,
    })
    upcycled_config = replace(config, arch="moe", moe_every=moe_every, dense_d_ff=width, moe=moe)
    upcycled_config.validate()
    torch.manual_seed(seed)
    model = MoETransformerLM(upcycled_config)
    dense_state = dense.state_dict()
    state = model.state_dict()
    for name in state:
        if name in dense_state and state[name].shape == dense_state[name].shape:
            state[name] = dense_state[name]
    model.load_state_dict(state)
    for layer_idx, (block, dense_block) in enumerate(zip(model.blocks, dense.blocks, strict=True)):
        ffn, dense_ffn = block.ffn, dense_block.ffn
        assert isinstance(dense_ffn, DenseFFN)
        if isinstance(ffn, MoE):
            ffn.experts.w_in.copy_(dense_ffn.w_in.expand_as(ffn.experts.w_in))
            ffn.experts.w_out.copy_(dense_ffn.w_out.expand_as(ffn.experts.w_out))
            torch.nn.init.normal_(ffn.router.weight, std=router_std)
        else:
            assert upcycled_config.ffn_width(layer_idx) == width
    return model


def upcycle(
    dense_run: str | Path, out: str | Path, num_experts: int, top_k: int, moe_every: int = 1,
    router_std: float = 1e-3, seed: int = 0,
) -> MoETransformerLM:
    """Upcycle the dense run directory ``dense_run`` into a new MoE run directory ``out``."""
    out = Path(out)
    if (out / CONFIG_FILE).exists():
        raise CheckpointError(f"{out / CONFIG_FILE}: {out} already holds a run; choose another --out")
    dense, payload = load_model_from_run(dense_run)
    model = upcycle_model(dense, num_experts, top_k, moe_every, router_std, seed)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / CONFIG_FILE,
        {
            "model": model.config.to_dict(),
            "train": read_run_config(Path(dense_run))["train"],
            "tokenizer": payload.get("tokenizer", ByteTokenizer().to_dict()),
        },
    )
    save_checkpoint(out, model, {"upcycled_from": str(dense_run)})
    return model
