"""Summaries, results.md and PNG figures of ``moekit multitask synthetic`` and ``census``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from moekit.experiments.multitask.census import PAPER_AUC, CensusResult
from moekit.experiments.multitask.plots import plot_gate_statistics
from moekit.experiments.multitask.synthetic import BAYES_LOSS, SyntheticResult

LABELS = {
    "mmoe": "MMoE",
    "omoe": "one-gate MoE",
    "shared_bottom": "shared-bottom",
    "cgc": "CGC",
    "ple": "PLE",
    "single_task": "single-task",
}
# Paired seeds: "beats" = lower loss on >= 70% of seeds; "ties" = neither does, a win rate in [0.3, 0.7].
TIE_WIN_RATE = (0.3, 0.7)


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------


def synthetic_summary(result: SyntheticResult) -> dict[str, Any]:
    """Per model and correlation: mean, median, sd, quartiles, failed runs; the acceptance checks."""
    settings = result.settings
    correlations = list(settings.correlations)
    per_model: dict[str, Any] = {}
    for arch, loss_CS in result.test_loss.items():
        rows = []
        for c, corr in enumerate(correlations):
            losses = loss_CS[c].double()
            rows.append(
                {
                    "correlation": corr,
                    "mean": losses.mean().item(),
                    "median": losses.median().item(),
                    "sd": losses.std().item() if losses.numel() > 1 else 0.0,
                    "q25": losses.quantile(0.25).item(),
                    "q75": losses.quantile(0.75).item(),
                    "min": losses.min().item(),
                    "max": losses.max().item(),
                    "failed": int((losses > settings.failed_threshold).sum()),
                    "gate_distance": result.gate_distance[arch][c].mean().item(),
                }
            )
        per_model[arch] = rows
    summary: dict[str, Any] = {
        "seeds": len(settings.seeds),
        "correlations": correlations,
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "failed_threshold": settings.failed_threshold,
        "seconds": result.seconds,
        "parameters": result.num_parameters,
        "models": per_model,
    }
    if "mmoe" in result.test_loss and "omoe" in result.test_loss:
        wins = (result.test_loss["mmoe"] < result.test_loss["omoe"]).double().mean(dim=1)
        summary["mmoe_beats_omoe"] = {str(corr): wins[c].item() for c, corr in enumerate(correlations)}
    summary["checks"] = _synthetic_checks(summary)
    return summary


def _synthetic_checks(summary: dict[str, Any]) -> dict[str, Any]:
    models, correlations = summary["models"], summary["correlations"]
    checks: dict[str, Any] = {}
    if "mmoe" in models and 1.0 in correlations and 0.5 in correlations:
        by_corr = {row["correlation"]: row for row in models["mmoe"]}
        rise = by_corr[0.5]["mean"] / by_corr[1.0]["mean"] - 1.0
        checks["mmoe_rise_1.0_to_0.5"] = {"value": rise, "target": "<= 0.10", "met": rise <= 0.10}
    if "mmoe_beats_omoe" in summary:
        wins = summary["mmoe_beats_omoe"]
        if "0.5" in wins:
            checks["mmoe_beats_omoe_at_0.5"] = {"value": wins["0.5"], "target": ">= 0.70", "met": wins["0.5"] >= 0.70}
        if "1.0" in wins:
            mm = {row["correlation"]: row["mean"] for row in models["mmoe"]}[1.0]
            om = {row["correlation"]: row["mean"] for row in models["omoe"]}[1.0]
            low, high = TIE_WIN_RATE
            checks["mmoe_ties_omoe_at_1.0"] = {
                "value": wins["1.0"],
                "mean_ratio": mm / om,
                "target": f"win rate in [{low:g}, {high:g}]",
                "met": low <= wins["1.0"] <= high,
            }
    if "shared_bottom" in models and len(models) > 1:
        worst_mean, most_failed = True, True
        for c in range(len(correlations)):
            sb = models["shared_bottom"][c]
            others = [rows[c] for arch, rows in models.items() if arch != "shared_bottom"]
            worst_mean &= all(sb["mean"] > row["mean"] for row in others)
            most_failed &= all(sb["failed"] >= row["failed"] for row in others)
        checks["shared_bottom_worst_mean"] = {"met": bool(worst_mean)}
        checks["shared_bottom_most_failed"] = {"met": bool(most_failed)}
    return checks


def write_synthetic_report(out: Path, result: SyntheticResult, summary: dict[str, Any], command: str) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        _plot_loss_vs_correlation(out / "synthetic_loss_vs_correlation.png", result),
        _plot_loss_distribution(out / "synthetic_loss_distribution.png", result),
    ]
    if any(result.gate_distance[arch].abs().sum() > 0 for arch in result.gate_distance):
        figures.append(_plot_gate_distance(out / "synthetic_gate_distance.png", result))
    for (arch, corr), stats in result.gate_stats.items():
        figures.append(
            plot_gate_statistics(
                stats,
                out / f"synthetic_gates_{arch}_p{corr:g}.png",
                title=f"{LABELS.get(arch, arch)} gate weights, correlation {corr:g} (seed {result.settings.seeds[0]})",
            )
        )
    settings = result.settings
    lines = [
        "# moekit multitask synthetic: results",
        "",
        f"Made by `{command}` in {result.seconds / 60:.1f} minutes (all models, "
        f"{len(settings.seeds)} seeds × {len(settings.correlations)} correlations, one replica-stacked "
        f"model per architecture). {settings.steps} Adam steps of batch {settings.batch_size} (fresh data "
        f"every step), lr {settings.lr:g} with cosine decay to {settings.lr_final_fraction:g}×; test loss: "
        f"mean squared error over {settings.test_size} test samples per seed, averaged over the two tasks. "
        f"Bayes loss {BAYES_LOSS}. A run *failed* when its final test loss is above "
        f"{settings.failed_threshold:g}.",
        "",
        "| model | params | correlation | mean | median | sd | q25 | q75 | min | max | failed | gate distance |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arch, rows in summary["models"].items():
        for row in rows:
            lines.append(
                f"| {LABELS.get(arch, arch)} | {summary['parameters'][arch]} | {row['correlation']:g} | "
                f"{row['mean']:.4f} | {row['median']:.4f} | {row['sd']:.4f} | {row['q25']:.4f} | {row['q75']:.4f} "
                f"| {row['min']:.4f} | {row['max']:.4f} | {row['failed']}/{summary['seeds']} | "
                f"{row['gate_distance']:.3f} |"
            )
    if "mmoe_beats_omoe" in summary:
        lines += ["", "MMoE's test loss below one-gate MoE's, paired by seed: " + ", ".join(
            f"{frac:.0%} at {corr}" for corr, frac in summary["mmoe_beats_omoe"].items()) + "."]
    lines += ["", "| check | measured | target | met |", "|---|---:|---|---|"]
    for name, check in summary["checks"].items():
        value = f"{check['value']:+.3f}" if "value" in check else ""
        lines.append(f"| {name} | {value} | {check.get('target', '')} | {'yes' if check['met'] else 'NO'} |")
    lines += ["", "Gate distance: the mean over test samples of the total-variation distance "
              "½‖g¹(x) − g²(x)‖₁ between the two tasks' gates (0 for one gate).", ""]
    lines += [f"![{path.stem}]({path.name})" for path in figures]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    per_seed = {
        "seeds": list(settings.seeds),
        "correlations": list(settings.correlations),
        "test_loss": {arch: loss.tolist() for arch, loss in result.test_loss.items()},
        "test_loss_per_task": {arch: loss.tolist() for arch, loss in result.test_loss_per_task.items()},
        "gate_distance": {arch: dist.tolist() for arch, dist in result.gate_distance.items()},
        "train_curve": {"steps": result.curve_steps, **result.train_curve},
    }
    (out / "per_seed.json").write_text(json.dumps(per_seed))
    return [out / "results.md", out / "per_seed.json", *figures]


def _archs(result: SyntheticResult) -> list[str]:
    return list(result.test_loss)


def _plot_loss_vs_correlation(path: Path, result: SyntheticResult) -> Path:
    correlations = np.array(result.settings.correlations)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, arch in enumerate(_archs(result)):
        loss = result.test_loss[arch].double().numpy()
        color = f"C{i}"
        offset = (i - 1) * 0.008
        ax.plot(correlations + offset, loss.mean(axis=1), "o-", color=color, label=f"{LABELS.get(arch, arch)} mean")
        ax.plot(correlations + offset, np.median(loss, axis=1), "s--", color=color, alpha=0.7,
                label=f"{LABELS.get(arch, arch)} median")
        q25, q75 = np.quantile(loss, 0.25, axis=1), np.quantile(loss, 0.75, axis=1)
        ax.vlines(correlations + offset, q25, q75, color=color, linewidth=4, alpha=0.35)
    ax.axhline(BAYES_LOSS, color="k", linestyle=":", label=f"Bayes loss {BAYES_LOSS}")
    ax.set_xlabel("task correlation p")
    ax.set_ylabel("final test MSE (mean of 2 tasks)")
    ax.set_yscale("log")
    ax.set_title(f"test loss vs correlation ({len(result.settings.seeds)} seeds; bars: 25-75%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_loss_distribution(path: Path, result: SyntheticResult) -> Path:
    correlations = result.settings.correlations
    fig, axes = plt.subplots(1, len(correlations), figsize=(4.2 * len(correlations), 3.6), sharey=True, squeeze=False)
    all_losses = np.concatenate([result.test_loss[a].double().numpy().ravel() for a in _archs(result)])
    bins = np.geomspace(max(all_losses.min() * 0.9, 1e-3), all_losses.max() * 1.1, 30)
    for c, corr in enumerate(correlations):
        ax = axes[0, c]
        for i, arch in enumerate(_archs(result)):
            ax.hist(result.test_loss[arch][c].double().numpy(), bins=bins, histtype="step", linewidth=1.6,
                    color=f"C{i}", label=LABELS.get(arch, arch))
        ax.axvline(result.settings.failed_threshold, color="r", linestyle="--", linewidth=1, label="failed above")
        ax.axvline(BAYES_LOSS, color="k", linestyle=":", linewidth=1, label="Bayes loss")
        ax.set_xscale("log")
        ax.set_xlabel("final test MSE")
        ax.set_title(f"correlation {corr:g}")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("runs (seeds)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("distribution of final test losses (trainability)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_gate_distance(path: Path, result: SyntheticResult) -> Path:
    correlations = np.array(result.settings.correlations)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, arch in enumerate(_archs(result)):
        dist = result.gate_distance[arch].double().numpy()
        if not dist.any():
            continue
        jitter = np.random.default_rng(0).uniform(-0.01, 0.01, dist.shape[1])
        for c, corr in enumerate(correlations):
            ax.scatter(corr + jitter, dist[c], s=6, color=f"C{i}", alpha=0.4)
        ax.errorbar(correlations, dist.mean(axis=1), yerr=dist.std(axis=1), fmt="o-", color=f"C{i}", capsize=3,
                    label=f"{LABELS.get(arch, arch)} (mean ± sd; dots: seeds)")
    ax.set_xlabel("task correlation p")
    ax.set_ylabel("½‖g¹(x) − g²(x)‖₁, test mean")
    ax.set_title("distance between the two tasks' gates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# census
# --------------------------------------------------------------------------------------------


def census_summary(result: CensusResult) -> dict[str, Any]:
    models = {}
    for arch, auc_SK in result.test_auc.items():
        auc = auc_SK.double()
        models[arch] = {
            "income_mean": auc[:, 0].mean().item(),
            "income_sd": auc[:, 0].std().item() if auc.shape[0] > 1 else 0.0,
            "marital_mean": auc[:, 1].mean().item(),
            "marital_sd": auc[:, 1].std().item() if auc.shape[0] > 1 else 0.0,
            "best_epoch": result.best_epoch[arch],
            "parameters": result.num_parameters[arch],
        }
    return {
        "seeds": len(result.settings.seeds),
        "epochs": result.settings.epochs,
        "batch_size": result.settings.batch_size,
        "lr": result.settings.lr,
        "seconds": result.seconds,
        "models": models,
        "paper": {arch: {"income": a, "marital": b} for arch, (a, b) in PAPER_AUC.items()},
    }


def write_census_report(out: Path, result: CensusResult, summary: dict[str, Any], command: str) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = result.settings
    lines = [
        "# moekit multitask census: results",
        "",
        f"Made by `{command}` in {result.seconds / 60:.1f} minutes. UCI Census-Income (KDD), task group 1 "
        f"(income > 50K; marital status never married); {len(settings.seeds)} seeds trained as one "
        f"replica-stacked model per architecture; {settings.epochs} epochs of batch {settings.batch_size}, "
        f"Adam lr {settings.lr:g}; each seed's test AUC at its epoch of best validation AUC. Test AUC mean ± sd "
        "over seeds, beside the MMoE paper's Table 2 (mean of its runs).",
        "",
        "| model | params | income AUC | marital AUC | paper income | paper marital | best epochs |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for arch, row in summary["models"].items():
        paper = PAPER_AUC.get(arch)
        lines.append(
            f"| {LABELS.get(arch, arch)} | {row['parameters']} | {row['income_mean']:.4f} ± {row['income_sd']:.4f} | "
            f"{row['marital_mean']:.4f} ± {row['marital_sd']:.4f} | {paper[0] if paper else '-'} | "
            f"{paper[1] if paper else '-'} | {','.join(map(str, row['best_epoch']))} |"
        )
    figures = [
        plot_gate_statistics(stats, out / f"census_gates_{arch}.png", title=f"{LABELS.get(arch, arch)} gate weights "
                             f"on the test set (seed {settings.seeds[0]})")
        for arch, stats in result.gate_stats.items()
    ]
    lines += ["", *[f"![{path.stem}]({path.name})" for path in figures]]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return [out / "results.md", *figures]
