"""PNG outputs of a run: the loss curve and test images beside their reconstructions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402


def plot_losses(metrics: list[dict], path: Path, *, initial_test_loss: float) -> None:
    """Plot mean training loss per epoch and test loss from the initial weights (epoch 0) on."""
    epochs = [record["epoch"] for record in metrics]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(epochs, [record["train_loss"] for record in metrics], marker="o", label="training (mean of batches)")
    axes.plot([0, *epochs], [initial_test_loss, *(record["test_loss"] for record in metrics)], marker="o", label="test")
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel("MSE reconstruction loss")
    axes.set_title("Farm training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_reconstructions(originals: torch.Tensor, reconstructions: torch.Tensor, path: Path) -> None:
    """Draw test images (top row) above their reconstructions (bottom row); inputs are (N, 784)."""
    count = originals.shape[0]
    figure, axes = plt.subplots(2, count, figsize=(1.2 * count, 2.8))
    for column in range(count):
        for row, images in enumerate((originals, reconstructions)):
            axes[row, column].imshow(images[column].reshape(28, 28).numpy(), cmap="gray", vmin=0, vmax=1)
            axes[row, column].axis("off")
    axes[0, 0].set_title("test", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
