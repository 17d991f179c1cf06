"""Deterministic one-pass training of a segment, and test-set evaluation."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from config.settings import TrainingSettings
from model.data import to_inputs
from model.network import Autoencoder
from model.weights import StateDict


def configure_torch(threads: int) -> None:
    """Pin the intra-op thread count and require deterministic algorithms for this process."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def job_seed(run_seed: int, epoch: int, segment: int) -> int:
    """Derive the batch-order seed of one job; every replica of the job derives the same seed."""
    sha = hashlib.sha256(f"batch-order:{run_seed}:{epoch}:{segment}".encode())
    return int.from_bytes(sha.digest()[:8], "little") & ((1 << 63) - 1)


def train_segment(
    state_dict: StateDict, images: torch.Tensor, settings: TrainingSettings, *, seed: int, device: str = "cpu"
) -> tuple[StateDict, float]:
    """Train one pass over uint8 `images` (N, 28, 28) from `state_dict` with a fresh Adam.

    Batches are scaled to float as they are drawn, so a cached segment costs one byte per pixel.
    Returns the new weights (on the CPU) and the mean of the per-batch MSE losses. Same
    images, same settings and same seed give bit-identical results in any process of the
    same numerical class (model/numerics.py). The batch order is drawn on the CPU, so it is
    the same on every device.
    """
    configure_torch(settings.threads)
    model = Autoencoder()
    model.load_state_dict(state_dict, strict=True)
    model.to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    criterion = nn.MSELoss()

    count = images.shape[0]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(count, generator=generator) if settings.shuffle else torch.arange(count)

    loss_sum = 0.0
    batches = 0
    for start in range(0, count, settings.batch_size):
        x = to_inputs(images[order[start : start + settings.batch_size]]).to(device)  # (batch, 784)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), x)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item()
        batches += 1

    new_state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    return new_state, loss_sum / batches


@torch.no_grad()
def evaluate(state_dict: StateDict, images: torch.Tensor, *, batch_size: int = 1000) -> float:
    """Return the mean squared reconstruction error over every pixel of uint8 `images` (N, 28, 28)."""
    model = Autoencoder()
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    squared_error = 0.0
    for start in range(0, images.shape[0], batch_size):
        x = to_inputs(images[start : start + batch_size])
        squared_error += float(((model(x) - x) ** 2).sum(dtype=torch.float64))
    return squared_error / images.numel()


@torch.no_grad()
def reconstruct(state_dict: StateDict, images: torch.Tensor) -> torch.Tensor:
    """Return the model's reconstructions (N, 784) of uint8 `images` (N, 28, 28)."""
    model = Autoencoder()
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    return model(to_inputs(images))
