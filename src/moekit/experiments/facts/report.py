"""results_g.md and g_facts.png of experiment (g): the facts table and the plot against experts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from moekit.experiments.compare.report import _machine
from moekit.experiments.facts.data import UNIFORM_VALUE_CE

RESULTS_FILE = "results_g.md"
FIGURE_FILE = "g_facts.png"
RUNTIME_BUDGET_MINUTES = 30


def _mean_sd(row: dict[str, Any], metric: str, digits: int = 3) -> str:
    mean, sd = row[f"{metric}_mean"], row[f"{metric}_sd"]
    return f"{mean:.{digits}f}" if len(row["seeds"]) == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _per_seed(values: list[float], digits: int = 3, signed: bool = False) -> str:
    return ", ".join(f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}" for v in values)


def _label(name: str, row: dict[str, Any]) -> str:
    if name == "dense":
        return f"dense (FFN {row['ffn_width']})"
    if name == "dense-wide":
        return f"dense-wide (FFN {row['ffn_width']})"
    return f"MoE E={row['experts']}"


def _yes(flag: bool) -> str:
    return "**yes**" if flag else "**no**"


def write_facts_report(out: Path, summary: dict[str, Any], command: str) -> Path:
    """Write results_g.md and g_facts.png into ``out``; returns the markdown's path."""
    config, facts, rows, paired, checks = (summary[k] for k in ("config", "facts", "models", "paired", "checks"))
    minutes = summary["seconds"] / 60
    moe_names = [f"moe-e{e}" for e in config["experts"]]
    order = ["dense", *moe_names, "dense-wide"]
    lines = [
        "# moekit compare (g): memorizing random facts, MoE vs dense at equal active compute",
        "",
        f"Made by `{command}` in {minutes:.1f} minutes on {_machine()} "
        f"({summary['seeds']} seed(s), {summary['steps']} steps per run, batch {config['batch_size']}, "
        f"context {config['seq_len']}).",
        "",
        f"Facts: {facts['num_facts']:,} ({facts['chosen_by']}), key {config['key_len']} letters → value "
        f"{config['value_len']} letters, one per line; {facts['bits_per_fact']:.2f} bits per fact "
        f"(log2 26^{config['value_len']}), {facts['total_bits']:,.0f} bits in all; {config['passes']} freshly "
        f"shuffled passes in the training text; {facts['heldout']} held-out keys never trained on. Model: "
        f"d_model {config['d_model']}, {config['n_layer']} layer(s), {config['n_head']} heads; MoE experts of "
        f"width {config['d_ff']}, top-{config['top_k']}, balance loss {config['balance_loss_coef']:g}, z-loss "
        f"{config['z_loss_coef']:g}. `dense` is the dense baseline of equal active compute of the "
        f"E={config['wide_experts']} MoE; `dense-wide` has that MoE's total FFN width (E·d_ff), the ceiling.",
        "",
        "Value CE: teacher-forced cross-entropy of the value bytes after `\\n` + key + `:`, nats per value byte "
        "over the full 256-byte softmax (uniform over letters = ln 26 = 3.258, stored = 0). Exact match: greedy "
        "decoding gives the whole value. Held-out CE: value CE on the held-out keys; it must stay near ln 26 "
        "(storage, not leakage). Mean ± sd over seeds.",
        "",
    ]
    if summary["calibration"]:
        lines += [
            "## Calibration (dense, seed 0): facts → exact match",
            "",
            "| facts | dense exact match | dense value CE | |",
            "|---|---|---|---|",
        ]
        for row in summary["calibration"]:
            chosen = "chosen" if row["chosen"] else ""
            lines.append(f"| {row['facts']:,} | {row['exact_match']:.3f} | {row['value_ce']:.3f} | {chosen} |")
        lines.append("")
    lines += [
        "## Results",
        "",
        "| model | total params | active params | value CE | exact match | held-out CE | train min |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in order:
        row = rows[name]
        lines.append(
            f"| {_label(name, row)} | {row['total_params']:,} | {row['active_params']:,} | "
            f"{_mean_sd(row, 'value_ce')} | {_mean_sd(row, 'exact_match')} | {_mean_sd(row, 'heldout_ce')} | "
            f"{row['train_seconds'] / 60:.2f} |"
        )
    lines += [
        "",
        "Per seed (seeds " + ", ".join(str(s) for s in rows["dense"]["seeds"]) + "):",
        "",
        "| model | value CE | exact match | held-out CE | held-out byte accuracy |",
        "|---|---|---|---|---|",
    ]
    for name in order:
        row = rows[name]
        lines.append(f"| {_label(name, row)} | {_per_seed(row['value_ce'])} | {_per_seed(row['exact_match'])} | "
                     f"{_per_seed(row['heldout_ce'])} | {_per_seed(row['heldout_byte_accuracy'], 4)} |")
    lines += [
        "",
        "Paired differences MoE − dense, per seed (same facts, same batches):",
        "",
        "| model | Δ value CE | Δ exact match | share of the dense → dense-wide gap recovered |",
        "|---|---|---|---|",
    ]
    for name in moe_names:
        diff = paired[name]
        recovered = "-" if diff["gap_recovered"] is None else f"{100 * diff['gap_recovered']:.0f}%"
        lines.append(f"| {_label(name, rows[name])} | {_per_seed(diff['value_ce_diff'], signed=True)} | "
                     f"{_per_seed(diff['exact_match_diff'], signed=True)} | {recovered} |")
    recovered = checks["gap_recovered"]
    lines += [
        "",
        "## The issue's acceptance checks, on these results",
        "",
        f"- best MoE ({_label(checks['best_moe'], rows[checks['best_moe']])}) below dense by ≥ 0.3 nats per value "
        f"byte in every seed: {_yes(checks['best_moe_beats_dense_by_0.3_every_seed'])} (margins "
        f"{_per_seed(checks['best_moe_margin_per_seed'], signed=True)})",
        f"- mean value CE falls with the number of experts up to 16: "
        f"{_yes(checks['value_ce_falls_with_experts_up_to_16'])}",
        f"- E={config['wide_experts']} recovers ≥ 60% of the dense → dense-wide gap: "
        f"{_yes(checks['recovers_60_percent_of_gap'])} "
        f"({'no gap' if recovered is None else f'{100 * recovered:.0f}%'})",
        f"- held-out CE within 0.05 of ln 26 for every model and seed: "
        f"{_yes(checks['heldout_within_0.05_of_uniform'])} (largest distance {checks['max_heldout_distance']:.3f})",
        "",
        "  Leakage, the reason for the held-out keys: held-out values are uniform letters the model never saw, "
        "so any model's expected held-out CE is ln 26 plus the KL divergence from uniform letters to its "
        "prediction (Gibbs' inequality): only leakage brings it below ln 26, while a model that guesses "
        "confidently for unseen keys (as memorizing models do) lies above. Leakage checks that "
        "overconfidence cannot fail:",
        f"  - held-out CE not below ln 26 − 0.05 for any model and seed: "
        f"{_yes(checks['heldout_ce_not_below_uniform'])} (lowest {checks['min_heldout_ce']:.3f})",
        f"  - held-out byte accuracy (teacher-forced argmax) at chance, 1/26 = "
        f"{checks['heldout_byte_accuracy_chance']:.4f}, within 3 binomial sd "
        f"(3 × {checks['heldout_byte_accuracy_chance_sd']:.4f}) for every model and seed: "
        f"{_yes(checks['heldout_byte_accuracy_at_chance'])} (largest gap "
        f"{checks['max_heldout_byte_accuracy_gap']:.4f})",
        f"- (g) ran within {RUNTIME_BUDGET_MINUTES} minutes: {_yes(minutes <= RUNTIME_BUDGET_MINUTES)} "
        f"({minutes:.1f} minutes of this command; runs it reused from an earlier one cost it nothing)",
    ]
    lines += _speed_lines(summary, rows, moe_names)
    lines += ["", f"![facts]({FIGURE_FILE})", ""]
    _figure(out / FIGURE_FILE, config, rows)
    path = out / RESULTS_FILE
    path.write_text("\n".join(lines))
    return path


def _speed_lines(summary: dict[str, Any], rows: dict[str, Any], moe_names: list[str]) -> list[str]:
    speed, equal = summary.get("speed"), summary.get("equal_time")
    if speed is None:
        return []
    ratios = speed["ratios"]
    lines = [
        f"- every MoE trains at ≥ 0.9x the dense model's tokens/s: "
        f"{_yes(all(ratios[n]['ratio'] >= 0.9 for n in moe_names))}",
        "",
        "## Training speed",
        "",
        f"The trainer's step (batch, forward, backward, clipping, AdamW) of each model in one process with "
        f"{speed['threads']} thread(s), as a grid worker has, in {speed['rounds']} rounds of "
        f"{speed['steps_per_round']} steps that visit the models in turn; tokens/s relative to dense in the same "
        f"round, median (lowest – highest round):",
        "",
        "| model | ms per step | tokens/s relative to dense |",
        "|---|---|---|",
    ]
    for name in ["dense", *moe_names]:
        r = ratios[name]
        lines.append(f"| {_label(name, rows[name])} | {1000 * r['seconds_per_step']:.2f} | "
                     f"{r['ratio']:.3f} ({r['min']:.3f} – {r['max']:.3f}) |")
    if equal is not None:
        mean, sd = equal["value_ce_mean_sd"]
        moe = equal["moe"]
        margins = equal["moe_margin"]
        winner = "the MoE" if all(m > 0 for m in margins) else "dense" if all(m < 0 for m in margins) else "neither"
        lines += [
            "",
            "## At equal wall time",
            "",
            f"The dense model trained for {equal['dense_steps']:,} steps, the time {_label(moe, rows[moe])} takes "
            f"for {summary['steps']:,} at the speed ratio above ({equal['ratio']:.3f}), rounded to 100 steps; "
            f"the same facts and batches per seed:",
            "",
            f"- dense, {equal['dense_steps']:,} steps: value CE {_per_seed(equal['value_ce'])} "
            f"(mean {mean:.3f} ± {sd:.3f}), exact match {_per_seed(equal['exact_match'])}",
            f"- {_label(moe, rows[moe])}, {summary['steps']:,} steps: value CE {_per_seed(rows[moe]['value_ce'])}",
            f"- the MoE's margin (dense − MoE value CE) per seed: {_per_seed(margins, signed=True)}: "
            f"{'in every seed ' if winner != 'neither' else ''}**{winner}** "
            f"{'wins' if winner != 'neither' else 'wins every seed'}",
        ]
    return lines


def _figure(path: Path, config: dict[str, Any], rows: dict[str, Any]) -> None:
    experts = list(config["experts"])
    moe_rows = [rows[f"moe-e{e}"] for e in experts]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, ylabel in ((axes[0], "value_ce", "value CE (nats per value byte)"),
                               (axes[1], "exact_match", "exact match")):
        means = [r[f"{metric}_mean"] for r in moe_rows]
        sds = [r[f"{metric}_sd"] for r in moe_rows]
        ax.errorbar(experts, means, yerr=sds, fmt="o-", capsize=3, label=f"MoE top-{config['top_k']}")
        for name, style in (("dense", "--"), ("dense-wide", ":")):
            ax.axhline(rows[name][f"{metric}_mean"], linestyle=style, color="gray" if name == "dense" else "black",
                       label=_label(name, rows[name]))
        if metric == "value_ce":
            heldout = [r["heldout_ce_mean"] for r in moe_rows]
            ax.plot(experts, heldout, "x", color="red", label="MoE, held-out keys")
            ax.axhline(UNIFORM_VALUE_CE, linestyle="-.", color="red", alpha=0.5, label="ln 26 (nothing stored)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(experts, [str(e) for e in experts])
        ax.set_xlabel("experts (log2 axis)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("memorizing random facts at equal active compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
