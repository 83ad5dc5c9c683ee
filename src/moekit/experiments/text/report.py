"""results_h.md and h_text.png of experiment (h): the ceiling, then MoE vs dense, on GCIDE prose."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from moekit.experiments.compare.report import _machine

RESULTS_FILE = "results_h.md"
FIGURE_FILE = "h_text.png"
RUNTIME_BUDGET_MINUTES = 30
ORDER = ("dense", "moe", "dense-wide")


def _label(name: str, row: dict[str, Any], config: dict[str, Any]) -> str:
    if name == "moe":
        return f"MoE {config['num_experts']}x{config['d_ff']} top-{config['top_k']}"
    return f"{name} (FFN {row['ffn_width']:,})"


def _per_seed(values: list[float], signed: bool = False) -> str:
    return " / ".join(f"{v:+.4f}" if signed else f"{v:.4f}" for v in values)


def _mean_sd(mean: float, sd: float, seeds: int) -> str:
    return f"{mean:.4f}" if seeds == 1 else f"{mean:.4f} ± {sd:.4f}"


def write_text_report(out: Path, summary: dict[str, Any], command: str) -> Path:
    """Write results_h.md and h_text.png into ``out``; returns the markdown's path."""
    config, corpus, use, rows, ceiling, moe = (
        summary[k] for k in ("config", "corpus", "epoch_use", "models", "ceiling", "moe")
    )
    minutes, seeds = summary["seconds"] / 60, summary["seeds"]
    order = [name for name in ORDER if name in rows]
    lines = [
        "# moekit compare (h): natural text with enough data, MoE vs dense",
        "",
        f"Made by `{command}` in {minutes:.1f} minutes on {_machine()} ({seeds} paired seed(s), "
        f"{summary['steps']:,} steps per run, batch {config['batch_size']}, context {config['seq_len']}, "
        f"{summary['jobs']} run(s) at a time).",
        "",
        f"Corpus: GCIDE (Webster 1913 + WordNet) as plain prose, {corpus['bytes']:,} bytes, sha256 "
        f"`{corpus['sha256'][:16]}…`; the first 90% trains, the last 10% (the end of the alphabet) is held out. "
        f"Each run reads {use['tokens_seen']:,} of {use['train_tokens']:,} training tokens: "
        f"**{use['epochs']:.3g} epochs** (random windows: about {100 * use['share_seen']:.1f}% of the training "
        f"bytes are seen, {100 * use['share_seen_twice_or_more']:.1f}% more than once). Held-out loss: cross-entropy "
        f"in nats per byte on the same {corpus['heldout_tokens']:,} held-out tokens (fixed, evenly spaced windows) "
        "for every model.",
        "",
        f"Models (d_model {config['d_model']}, {config['n_layer']} layer(s), {config['n_head']} heads): `dense` has "
        f"the MoE's active FLOPs per token (`LMConfig.as_dense()`); `dense-wide` one FFN of the MoE's total expert "
        f"width ({config['num_experts']} x {config['d_ff']}), the ceiling of what the MoE's extra parameters can "
        f"buy; the MoE has {config['num_experts']} experts of {config['d_ff']}, top-{config['top_k']}, balance loss "
        f"{config['balance_loss_coef']:g}, z-loss {config['z_loss_coef']:g}. Paired: the models of one seed train "
        "on the same batches in the same order from the same non-expert initialization.",
        "",
        "## Held-out loss",
        "",
        "| model | total params | active params | held-out nats/byte | per seed | train min | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in order:
        row = rows[name]
        lines.append(
            f"| {_label(name, row, config)} | {row['total_params']:,} | {row['active_params']:,} | "
            f"{_mean_sd(row['heldout_loss_mean'], row['heldout_loss_sd'], seeds)} | "
            f"{_per_seed(row['heldout_loss'])} | {row['train_seconds'] / 60:.2f} | {row['tokens_per_s']:,.0f} |"
        )
    reached = ceiling["reached"]
    lines += [
        "",
        "## The ceiling: dense − dense-wide",
        "",
        f"Per seed: {_per_seed(ceiling['per_seed'], signed=True)} nats/byte; mean "
        f"**{ceiling['mean']:+.4f}**" + (f" ± {ceiling['sd']:.4f}" if seeds > 1 else "") + ". "
        + (
            f"It reaches the issue's {ceiling['threshold']:g} nats/byte, so the MoE was trained."
            if reached else
            f"It is below the issue's {ceiling['threshold']:g} nats/byte: even a dense model with all the MoE's "
            "expert parameters active gains too little at this size and length for the MoE to show the 0.02 "
            "nats/byte the issue asks for, so the MoE runs were skipped and this measurement is the result."
        ),
        "",
    ]
    if moe is not None:
        recovered = moe["ceiling_recovered"]
        lines += [
            "## MoE − dense (paired)",
            "",
            f"Per seed: {_per_seed(moe['moe_minus_dense'], signed=True)} nats/byte (negative: the MoE is better); "
            f"mean {moe['moe_minus_dense_mean']:+.4f}. Share of the ceiling recovered: "
            + ("-" if recovered is None else f"{100 * recovered:.0f}%") + ".",
            "",
            "The issue's acceptance check: the MoE beats dense by at least 0.02 nats/byte with every paired seed "
            "positive: " + ("**yes**" if moe["beats_dense_by_0.02_all_seeds_positive"] else "**no**") + ".",
            "",
        ]
    within = minutes <= RUNTIME_BUDGET_MINUTES
    lines += [
        f"Runtime: {minutes:.1f} minutes for this command ("
        + ("within" if within else "over") + f" the {RUNTIME_BUDGET_MINUTES}-minute budget; runs reused from an "
        "earlier command cost it nothing).",
        "",
        f"![text]({FIGURE_FILE})",
        "",
    ]
    _figure(out / FIGURE_FILE, config, rows, seeds)
    path = out / RESULTS_FILE
    path.write_text("\n".join(lines))
    return path


def _figure(path: Path, config: dict[str, Any], rows: dict[str, Any], seeds: int) -> None:
    order = [name for name in ORDER if name in rows]
    colors = {"dense": "tab:gray", "moe": "tab:blue", "dense-wide": "black"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # Left: held-out loss per seed, a line joining the models of one seed (paired).
    for seed in range(seeds):
        xs = list(range(len(order)))
        ys = [rows[name]["heldout_loss"][seed] for name in order]
        axes[0].plot(xs, ys, "o-", alpha=0.7, label=f"seed {seed}")
    axes[0].set_xticks(range(len(order)), [_label(n, rows[n], config) for n in order], fontsize=8)
    axes[0].set_ylabel("held-out loss (nats/byte)")
    axes[0].set_title("fixed held-out set, paired seeds")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    # Right: the trainer's validation loss over training, every seed.
    for name in order:
        for i, curve in enumerate(rows[name]["curves"]):
            if curve:
                steps, losses = zip(*curve, strict=True)
                axes[1].plot(steps, losses, color=colors[name], alpha=0.7,
                             label=_label(name, rows[name], config) if i == 0 else None)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(f"validation loss ({config['eval_batches']} fixed batches)")
    axes[1].set_title("learning curves")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("(h) GCIDE prose: dense vs MoE vs dense-wide")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
