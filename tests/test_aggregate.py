"""Size-weighted averaging of segment weights."""

import pytest
import torch

from model.aggregate import weighted_average


def test_equal_sizes_give_mean():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([3.0, 6.0])}
    assert torch.equal(weighted_average([a, b], [5, 5])["w"], torch.tensor([2.0, 4.0]))


def test_sizes_weight_the_average():
    a = {"w": torch.tensor([0.0])}
    b = {"w": torch.tensor([4.0])}
    assert torch.equal(weighted_average([a, b], [3, 1])["w"], torch.tensor([1.0]))


def test_average_keeps_dtype():
    a = {"w": torch.tensor([1.0], dtype=torch.float32)}
    assert weighted_average([a, a], [1, 2])["w"].dtype == torch.float32


def test_single_segment_is_identity():
    a = {"w": torch.randn(5, 3)}
    assert torch.equal(weighted_average([a], [7])["w"], a["w"])


def test_mismatched_sizes_rejected():
    with pytest.raises(ValueError, match="one size per state_dict"):
        weighted_average([{"w": torch.zeros(1)}], [1, 2])


def test_non_positive_size_rejected():
    with pytest.raises(ValueError, match="must be positive"):
        weighted_average([{"w": torch.zeros(1)}], [0])
