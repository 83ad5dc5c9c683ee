"""Figures of the multi-task experiments: each task's gate weights per expert (MMoE Fig. 6,
PLE Fig. 8), from ``moekit.models.multitask.gate_statistics``.

Plotting lives here, with the research code, so that the library's models never import
matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from moekit.models.multitask import GateStatistics


def plot_gate_statistics(stats: GateStatistics, path: Path, title: str = "gate weights per task") -> Path:
    """Bars of each task's mean gate weight per expert, with ±1 sd whiskers."""
    num_tasks, num_experts = stats.mean_KE.shape
    width = 0.8 / num_tasks
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * num_experts + 2), 3.6))
    for k, name in enumerate(stats.task_names):
        positions = [e + (k - (num_tasks - 1) / 2) * width for e in range(num_experts)]
        ax.bar(positions, stats.mean_KE[k].tolist(), width, yerr=stats.std_KE[k].tolist(), capsize=2, label=name)
    ax.set_xticks(range(num_experts))
    ax.set_xlabel("expert")
    ax.set_ylabel("gate weight (mean ± sd)")
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
