"""Weighted averaging of accepted segment weights into the next epoch's weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.weights import StateDict


def weighted_average(state_dicts: Sequence[StateDict], sizes: Sequence[int]) -> StateDict:
    """Average state_dicts weighted by segment size, accumulating in float64 in the given order."""
    if not state_dicts or len(state_dicts) != len(sizes):
        raise ValueError(f"need one size per state_dict, got {len(state_dicts)} state_dicts and {len(sizes)} sizes")
    if any(size <= 0 for size in sizes):
        raise ValueError(f"segment sizes must be positive, got {list(sizes)}")
    total = float(sum(sizes))
    averaged: StateDict = {}
    for name, first in state_dicts[0].items():
        accumulator = torch.zeros(first.shape, dtype=torch.float64)
        for state_dict, size in zip(state_dicts, sizes):
            accumulator += state_dict[name].to(torch.float64) * (size / total)
        averaged[name] = accumulator.to(first.dtype)
    return averaged
