"""Built-in example models and data (no downloads): used by the CLI, the demo and the notebooks."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-style CNN for small images (digits are 1 x 8 x 8): stem, three stages of two blocks."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(Block(width, width), Block(width, width))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width))
        self.layer3 = nn.Sequential(Block(2 * width, 4 * width, 2), Block(4 * width, 4 * width))
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_resnet(width: int = 32) -> nn.Module:
    """Factory for `tritonprune inspect tritonprune.examples:small_resnet --input-shape 1,1,8,8`."""
    return SmallResNet(width=width)


def mlp(width: int = 256, depth: int = 3, in_features: int = 64, num_classes: int = 10) -> nn.Module:
    """A Linear/BatchNorm1d/ReLU stack (input: flat vectors), for benchmarks at several sizes."""
    layers: list[nn.Module] = []
    d = in_features
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def load_digits(seed: int = 0, test_size: float = 0.25, limit: int | None = None):
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), split stratified by class.

    Returns float32 tensors `(x_train, y_train, x_test, y_test)`, images as `[N, 1, 8, 8]`, normalized
    with the training set's mean and std. `limit` keeps only that many training images (quick runs).
    """
    try:
        from sklearn.datasets import load_digits as _load
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # sklearn is a dev dependency, not a runtime one
        raise SystemExit(
            "tritonprune: the digits data comes with scikit-learn; install it with "
            "`pip install scikit-learn` (or `pip install -e .[dev]`)"
        ) from e
    data = _load()
    x = data.images.astype("float32") / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, data.target, test_size=test_size, stratify=data.target,
                                              random_state=seed)
    if limit is not None and limit < len(x_tr):
        x_tr, _, y_tr, _ = train_test_split(x_tr, y_tr, train_size=limit, stratify=y_tr, random_state=seed)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_tr = torch.from_numpy((x_tr - mean) / std).unsqueeze(1)
    x_te = torch.from_numpy((x_te - mean) / std).unsqueeze(1)
    return x_tr, torch.from_numpy(y_tr).long(), x_te, torch.from_numpy(y_te).long()
