"""Drawing helpers: numpy/PIL images and matplotlib figures drawn without pyplot's global state."""

from __future__ import annotations

import io

from matplotlib.figure import Figure
from PIL import Image


def figure_to_image(fig: Figure, dpi: int = 100) -> Image.Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def plot_training_history(history: list[dict]) -> Image.Image:
    """Loss, accuracy and learning rate per epoch, like the report's training-statistics figure."""
    fig = Figure(figsize=(12, 3.6))
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], label="train")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], label="validation")
    ax_acc.set(title="accuracy", xlabel="epoch")
    ax_lr.plot(epochs, [h["lr"] for h in history])
    ax_lr.set(title="learning rate", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_to_image(fig)
