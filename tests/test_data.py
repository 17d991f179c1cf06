"""Segments by index modulo S, and the data digest that binds a job to its images."""

import pytest
import torch

from model.data import DatasetError, data_digest, load_images, segment_images, segment_size


@pytest.mark.parametrize("segments", [1, 2, 3, 7])
def test_segments_partition_indices(segments):
    images = torch.arange(100).reshape(100, 1, 1)
    parts = [segment_images(images, segments, k) for k in range(segments)]
    indices = sorted(int(i) for part in parts for i in part.flatten())
    assert indices == list(range(100))


def test_segment_holds_index_mod_s():
    images = torch.arange(10).reshape(10, 1, 1)
    assert segment_images(images, 2, 0).flatten().tolist() == [0, 2, 4, 6, 8]
    assert segment_images(images, 2, 1).flatten().tolist() == [1, 3, 5, 7, 9]


@pytest.mark.parametrize(("total", "segments", "sizes"), [(10, 3, [4, 3, 3]), (60000, 2, [30000, 30000]), (5, 1, [5])])
def test_segment_size_counts(total, segments, sizes):
    assert [segment_size(total, segments, k) for k in range(segments)] == sizes


def test_segment_out_of_range_rejected():
    with pytest.raises(ValueError, match="segment 2 is out of range for 2 segments"):
        segment_images(torch.zeros(4, 1, 1), 2, 2)


def test_data_digest_changes_with_one_pixel():
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    changed = images.clone()
    changed[2, 3, 4] = 1
    assert data_digest("mnist", 2, 0, images) != data_digest("mnist", 2, 0, changed)


def test_data_digest_binds_segment_position():
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    assert data_digest("mnist", 2, 0, images) != data_digest("mnist", 2, 1, images)


def test_mnist_loads_from_data_root(data_root):
    images = load_images(str(data_root), "mnist", train=True)
    assert tuple(images.shape) == (60000, 28, 28)
    assert images.dtype == torch.uint8


def test_missing_dataset_names_file_and_fix(tmp_path):
    with pytest.raises(DatasetError) as caught:
        load_images(str(tmp_path), "mnist", train=True, download=False)
    assert f"{tmp_path}/MNIST/raw/train-images-idx3-ubyte is missing" in str(caught.value)
    assert "pass --download" in str(caught.value)
