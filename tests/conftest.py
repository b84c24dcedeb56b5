import os

import pytest
import torch
from torch import nn

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 8) -> nn.Module:
    """A two-stage CNN for fast tests."""
    w = width
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes))


@pytest.fixture
def make_cnn():
    return tiny_cnn


@pytest.fixture(scope="session")
def fashion_train():
    from mcmi_lab import load_dataset
    return load_dataset("fashion-mnist", "train")


@pytest.fixture(scope="session")
def fashion_test():
    from mcmi_lab import load_dataset
    return load_dataset("fashion-mnist", "test")


def random_images(n=64, k=4, c=1, size=12, seed=0):
    from mcmi_lab import from_tensors
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    images = torch.randint(0, 80, (n, c, size, size), generator=g, dtype=torch.uint8)
    # make the classes learnable: a class-dependent bright square
    for cls in range(k):
        images[labels == cls, :, cls * 2:cls * 2 + 3, 2:5] = 255
    return from_tensors(images, labels, [f"c{i}" for i in range(k)])
