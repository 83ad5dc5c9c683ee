"""``moekit inspect``: load a run, record its routing over labelled texts, compute every
figure's numbers (metrics.py) and write report.html, the PNGs and routing.json (report.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moekit.experiments.inspect import metrics
from moekit.experiments.inspect.record import (
    InspectError,
    LayerRouting,
    Probe,
    load_probe,
    piece_per_token,
    record_routing,
    vocab_piece,
)
from moekit.layer import moe_layers

REPORT_MARKER = "moekit inspect"
TOP_TOKENS = 10
RARE_EXPERT_TOKENS = 20  # fewer first-choice tokens than this: no speciality is claimed


def load_run(model_dir: Path, flag: str = "MODEL") -> tuple[nn.Module, dict]:
    """The model and run config of a run directory; errors name ``flag``."""
    from moekit.training.checkpoint import CheckpointError, load_model_from_run

    if not model_dir.exists():
        raise InspectError(f"{flag} {model_dir}: does not exist")
    if not model_dir.is_dir():
        raise InspectError(f"{flag} {model_dir}: is not a directory (expected a moekit run directory)")
    try:
        model, payload = load_model_from_run(model_dir)
    except CheckpointError as error:
        raise InspectError(f"{flag}: {error}") from error
    return model, payload


def load_checkpoint(path: Path, model_payload: dict) -> tuple[nn.Module, int | None]:
    """A --checkpoints entry: a run directory, or a checkpoint directory (model.safetensors)
    of a model with MODEL's config. Returns the model and its training step when known."""
    from moekit.models.lm import LMConfig, MoETransformerLM
    from moekit.training.checkpoint import (
        CHECKPOINT_DIR,
        STATE_FILE,
        WEIGHTS_FILE,
        CheckpointError,
        find_checkpoint,
        load_state,
        load_weights,
    )

    if not path.is_dir():
        raise InspectError(f"--checkpoints {path}: is not a directory (a run or checkpoint directory)")
    try:
        if (path / "config.json").exists():
            model, payload = load_run(path, "--checkpoints")
            if payload["model"] != model_payload["model"]:
                raise InspectError(f"--checkpoints {path}: its model config differs from MODEL's")
            ckpt = find_checkpoint(path)
        elif (path / WEIGHTS_FILE).exists():
            model = MoETransformerLM(LMConfig.from_dict(model_payload["model"]))
            load_weights(model, path / WEIGHTS_FILE)
            ckpt = path
        else:
            raise InspectError(
                f"--checkpoints {path}: neither a run directory (config.json) nor a checkpoint "
                f"directory ({WEIGHTS_FILE}; e.g. RUN/{CHECKPOINT_DIR})"
            )
        step = None
        if (ckpt / STATE_FILE).exists():
            step = load_state(ckpt / STATE_FILE).get("step")
    except CheckpointError as error:
        raise InspectError(f"--checkpoints: {error}") from error
    return model, step


def check_out_dir(out: Path) -> bool:
    """--out must be new, empty, or a previous inspect report (replaced). True if replacing."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise InspectError(f"--out {out}: exists and is not a directory")
    entries = list(out.iterdir())
    if not entries:
        return False
    previous = out / "routing.json"
    try:
        is_report = json.loads(previous.read_text()).get("tool") == REPORT_MARKER
    except (OSError, ValueError, AttributeError):
        is_report = False
    if not is_report:
        raise InspectError(
            f"--out {out}: exists and holds other files (not a previous moekit inspect report); "
            "choose a new or empty directory"
        )
    return True


def run_inspect(
    model_dir: str | Path,
    data_files: list[str],
    out: str | Path,
    layers: list[int] | None = None,
    checkpoints: list[str] | None = None,
    tokens_per_domain: int = 32768,
    batch_size: int | None = None,
    sample_windows: int = 3,
    progress: bool = True,
    command: str = "moekit inspect",
) -> tuple[dict[str, Any], list[LayerRouting], Probe, Any]:
    """Everything ``moekit inspect`` does; returns routing.json's content, the routings, the
    probe and the tokenizer (for --terminal)."""
    from moekit.experiments.inspect import report
    from moekit.training.data import tokenizer_from_dict

    started = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    model, payload = load_run(model_dir)
    model_config = model.config
    if not moe_layers(model):
        raise InspectError(
            f"MODEL {model_dir}: has no MoE layer (arch={model_config.arch!r}); inspect needs an MoE model"
        )
    moe_blocks = [b for b in range(model_config.n_layer) if model_config.is_moe_layer(b)]
    if layers is not None:
        bad = [b for b in layers if b not in moe_blocks]
        if bad:
            raise InspectError(
                f"--layers {','.join(map(str, layers))}: block(s) {bad} are not MoE layers; MoE blocks are {moe_blocks}"
            )
    if not data_files:
        raise InspectError("--data: give at least one text file")
    replacing = check_out_dir(out)
    checkpoint_dirs = [Path(c) for c in checkpoints or []]
    for path in checkpoint_dirs:
        if not path.is_dir():
            raise InspectError(f"--checkpoints {path}: is not a directory (a run or checkpoint directory)")
    tokenizer = tokenizer_from_dict(payload.get("tokenizer", {"kind": "bytes"}))
    probe = load_probe([Path(f) for f in data_files], tokenizer, model_config.seq_len, tokens_per_domain)
    train_batch = int(payload.get("train", {}).get("batch_size", 16))
    batch = batch_size or train_batch

    # NOTE: routing noise is training-only, but the replayed "random" drop priority draws from
    # torch's generator: seeded, the same run gives the same report.
    torch.manual_seed(0)
    routings = record_routing(model, probe, batch, progress)
    chosen = layers if layers is not None else default_layers(moe_blocks)

    results = analyse(probe, routings, tokenizer, model_config.seq_len, chosen)
    results.update(
        {
            "tool": REPORT_MARKER,
            "command": command,
            "model": str(model_dir),
            "model_config": {
                "n_layer": model_config.n_layer,
                "d_model": model_config.d_model,
                "seq_len": model_config.seq_len,
                "num_experts": model_config.moe.num_experts,
                "top_k": model_config.moe.top_k,
                "router": model_config.moe.router,
                "capacity_factor": model_config.moe.capacity_factor,
                "eval_capacity_factor": model_config.moe.eval_capacity_factor,
                "drop_priority": model_config.moe.drop_priority,
                "batch_size": batch,
                "tokenizer": getattr(tokenizer, "kind", "bytes"),
            },
            "domains": [
                {
                    "name": name,
                    "file": str(file),
                    "tokens": int((probe.domain_T == d).sum()),
                    "sequences": int(np.unique(probe.sequence_T[probe.domain_T == d]).size),
                }
                for d, (name, file) in enumerate(zip(probe.domains, data_files, strict=True))
            ],
        }
    )
    results["stability"] = stability(model_dir, checkpoint_dirs, payload, probe, routings, batch, progress)
    results["seconds"] = time.perf_counter() - started
    results["summary"] = summary(results)
    out.mkdir(parents=True, exist_ok=True)
    report.write_report(out, results, probe, routings, tokenizer, chosen, sample_windows, replacing)
    return results, routings, probe, tokenizer


def default_layers(moe_blocks: list[int]) -> list[int]:
    """First, middle and last MoE blocks (Mixtral Fig. 7 shows layers 0, 15 and 31)."""
    picks = [moe_blocks[0], moe_blocks[len(moe_blocks) // 2], moe_blocks[-1]]
    return sorted(set(picks))


def analyse(
    probe: Probe,
    routings: list[LayerRouting],
    tokenizer,
    seq_len: int,
    chosen: list[int],
) -> dict[str, Any]:
    """Every figure's numbers, per MoE block."""
    edges = metrics.position_buckets(seq_len)
    num_domains = len(probe.domains)
    vocab_size = int(max(probe.token_T.max() + 1, getattr(tokenizer, "vocab_size", 0)))
    class_T = metrics.classify_pieces(piece_per_token(probe.token_T, tokenizer))
    labels: dict[int, str] = {}

    def label(token_id: int) -> str:
        if token_id not in labels:
            labels[token_id] = vocab_piece(token_id, tokenizer)
        return labels[token_id]

    per_layer: dict[str, Any] = {}
    for routing in routings:
        num_experts = routing.num_experts
        expert_TK = routing.expert_TK
        first_T = expert_TK[:, 0]
        shares, divergence = {}, {}
        for choice in metrics.CHOICES:
            if choice == "second" and expert_TK.shape[1] < 2:
                continue
            domain_GE, counts_G = metrics.assignment_shares(expert_TK, probe.domain_T, num_domains, num_experts, choice)
            whole_GE, _ = metrics.assignment_shares(expert_TK, np.zeros_like(probe.domain_T), 1, num_experts, choice)
            shares[choice] = {
                "domains": domain_GE.tolist(),
                "whole": whole_GE[0].tolist(),
                "assignments": counts_G.tolist(),
            }
            divergence[choice] = metrics.domain_divergence(
                expert_TK, probe.domain_T, probe.sequence_T, num_domains, num_experts, choice
            )
        top_k = expert_TK.shape[1]
        experts_top = metrics.top_tokens(probe.token_T, first_T, num_experts, vocab_size, TOP_TOKENS)
        for row in experts_top:
            row["by_count"] = [[label(i), i, c, s] for i, c, s in row["by_count"]]
            row["by_lift"] = [[label(i), i, lift, c] for i, lift, c in row["by_lift"]]
        classes = metrics.class_profile(class_T, first_T, num_experts)
        classes["names"] = list(metrics.TOKEN_CLASSES)
        classes["speciality"] = specialities(classes, experts_top)
        per_layer[str(routing.block)] = {
            "name": routing.name,
            "shares": shares,
            "divergence": divergence,
            "repetition": {
                "measured": metrics.consecutive_repetition(expert_TK, probe.sequence_T, probe.position_T),
                "uniform": metrics.uniform_repetition_baselines(num_experts, top_k),
                "load_matched": metrics.load_matched_repetition_baselines(expert_TK, num_experts),
            },
            "determinism": metrics.token_determinism(
                probe.token_T, first_T, probe.sequence_T, probe.position_T, num_experts, vocab_size, edges
            ),
            "top_tokens": experts_top,
            "classes": classes,
            "load": metrics.load_stats(expert_TK, routing.entropy_T, num_experts),
            "drops": (
                metrics.drops_by_position(expert_TK, routing.kept_TK, probe.position_T, edges)
                if routing.kept_TK is not None
                else None
            ),
        }
    return {
        "layers": [r.block for r in routings],
        "chosen_layers": chosen,
        "position_buckets": metrics.bucket_labels(edges, seq_len),
        "tokens": int(probe.token_T.size),
        "per_layer": per_layer,
    }


def specialities(classes: dict[str, Any], top: list[dict[str, Any]]) -> list[str]:
    """A short label per expert: its token class when that class is at least 30% of the
    expert's (first-choice) tokens and twice as common there as overall, then the fewest most
    frequent tokens (at most 4) that make up 80% of its tokens when that many do; "mixed" when
    neither holds; "rarely first" when it is the first choice of too few tokens to say."""
    labels = []
    for share_C, lift_C, row in zip(classes["share"], classes["lift"], top, strict=True):
        if row["tokens"] < RARE_EXPERT_TOKENS:
            labels.append(f"rarely first ({row['tokens']} tokens)")
            continue
        parts = []
        candidates = [(s, c) for c, (s, lift) in enumerate(zip(share_C, lift_C, strict=True)) if s >= 0.3 and lift >= 2]
        if candidates:
            s, c = max(candidates)
            parts.append(f"{metrics.TOKEN_CLASSES[c]} {s:.0%}")
        covered, tokens = 0.0, []
        for label, _, _, share in row["by_count"][:4]:
            tokens.append(label)
            covered += share
            if covered >= 0.8:
                parts.append(f"{' '.join(tokens)} ({covered:.0%})")
                break
        labels.append(": ".join(parts) if parts else "mixed")
    return labels


def stability(
    model_dir: Path,
    checkpoint_dirs: list[Path],
    payload: dict,
    probe: Probe,
    routings: list[LayerRouting],
    batch: int,
    progress: bool,
) -> dict[str, Any]:
    """Agreement of each --checkpoints model's routing with MODEL's on the same probe."""
    rows = []
    final = {r.block: r.expert_TK for r in routings}
    for path in checkpoint_dirs:
        model, step = load_checkpoint(path, payload)
        other = record_routing(model, probe, batch, progress, desc=f"routing {path.name}")
        rows.append(
            {
                "path": str(path),
                "step": step,
                "per_layer": {str(r.block): metrics.routing_agreement(r.expert_TK, final[r.block]) for r in other},
            }
        )
    rows.sort(key=lambda row: (row["step"] is None, row["step"] or 0))
    note = None
    if not rows:
        note = (
            "only one checkpoint (MODEL): moekit runs keep their latest checkpoint only, so routing "
            "stability over training needs earlier checkpoints, given with --checkpoints DIR,DIR"
        )
    return {"final": str(model_dir), "checkpoints": rows, "note": note}


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline figures per layer: what --json prints."""
    layers = {}
    for block, row in results["per_layer"].items():
        rep = row["repetition"]
        layers[block] = {
            "router_entropy": row["load"]["entropy"],
            "router_entropy_max": row["load"]["entropy_max"],
            "load_cv": row["load"]["cv"],
            "dead_experts": row["load"]["dead"],
            "repeat_first": rep["measured"]["first"],
            "repeat_first_uniform": rep["uniform"]["first"],
            "repeat_first_load_matched": rep["load_matched"]["first"],
            "repeat_any_shared": rep["measured"]["any_shared"],
            "repeat_any_shared_uniform": rep["uniform"]["any_shared"],
            "repeat_any_shared_load_matched": rep["load_matched"]["any_shared"],
            "determinism": row["determinism"]["accuracy"],
            "determinism_coverage": row["determinism"]["coverage"],
            "js_either": row["divergence"]["either"]["js"],
            "js_either_shuffled": row["divergence"]["either"]["shuffled_js"],
            "dropped_fraction": row["drops"]["overall"] if row["drops"] else None,
            "speciality": row["classes"]["speciality"],
        }
    return {
        "model": results["model"],
        "tokens": results["tokens"],
        "domains": [d["name"] for d in results["domains"]],
        "num_experts": results["model_config"]["num_experts"],
        "top_k": results["model_config"]["top_k"],
        "layers": layers,
        "stability": [
            {"step": row["step"], "path": row["path"], "per_layer": row["per_layer"]}
            for row in results["stability"]["checkpoints"]
        ],
        "seconds": results["seconds"],
    }
