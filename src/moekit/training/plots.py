"""PNG plots of a training run: losses, expert load per layer over training, dropped tokens."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import numpy as np


def plot_run(run_dir: Path, history: list[dict], layer_names: list[str]) -> list[Path]:
    """Write loss.png, expert_load.png and dropped_tokens.png (the last two for MoE runs)."""
    run_dir = Path(run_dir)
    written: list[Path] = []
    if not history:
        return written
    steps = [row["step"] for row in history]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [row["train_loss"] for row in history], label="train", alpha=0.8)
    val = [(row["step"], row["val_loss"]) for row in history if row.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(run_dir / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    rows_with_load = [row for row in history if row.get("expert_load")]
    if rows_with_load and layer_names:
        num_layers = len(rows_with_load[0]["expert_load"])
        fig, axes = plt.subplots(num_layers, 1, figsize=(8, 1.6 + 1.4 * num_layers), squeeze=False)
        load_steps = [row["step"] for row in rows_with_load]
        for layer in range(num_layers):
            # [experts, time]: the fraction of the layer's assignments each expert got.
            load_ET = np.array([row["expert_load"][layer] for row in rows_with_load]).T
            num_experts = load_ET.shape[0]
            ax = axes[layer][0]
            image = ax.imshow(
                load_ET * num_experts, aspect="auto", cmap="viridis", vmin=0, vmax=2, interpolation="nearest",
                extent=(load_steps[0], load_steps[-1], num_experts - 0.5, -0.5),
            )
            name = layer_names[layer] if layer < len(layer_names) else f"layer {layer}"
            ax.set_ylabel(f"{name}\nexpert", fontsize=8)
            fig.colorbar(image, ax=ax, label="load × E (1 = even)")
        axes[-1][0].set_xlabel("step")
        fig.suptitle("expert load over training")
        fig.tight_layout()
        written.append(run_dir / "expert_load.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(load_steps, [row.get("dropped_fraction") or 0.0 for row in rows_with_load], label="dropped")
        ax.plot(
            load_steps, [row.get("load_imbalance") or 0.0 for row in rows_with_load], label="max/mean load"
        )
        ax.set_xlabel("step")
        ax.set_title("dropped-assignment fraction and load imbalance (mean over layers)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(run_dir / "dropped_tokens.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
