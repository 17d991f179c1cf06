"""The fully connected MNIST autoencoder: 784 -> 9 -> 784."""

from __future__ import annotations

import torch
from torch import nn

ENCODER_WIDTHS = (784, 128, 64, 36, 18, 9)


def _stack(widths: tuple[int, ...]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
        if index:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(width_in, width_out))
    return layers


class Autoencoder(nn.Module):
    """Encoder 784-128-64-36-18-9 (no activation on the code), mirrored decoder with a final Sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*_stack(ENCODER_WIDTHS))
        self.decoder = nn.Sequential(*_stack(ENCODER_WIDTHS[::-1]), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 784) in [0, 1]
        return self.decoder(self.encoder(x))


def initial_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Return freshly initialised weights drawn from `seed`, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {name: tensor.detach().clone() for name, tensor in Autoencoder().state_dict().items()}
