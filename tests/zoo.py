"""A zoo of tiny models covering the channel-coupling rules, written for the tests (no torchvision).

`ZOO[name]()` returns `(model, example_inputs)` with `example_inputs` a tuple of positional arguments
(batch 2). Channel counts are deliberately not all powers of two, spatial sizes are small, and every
model ends in a head whose output channels reach a model output (so they are never pruned).
Each forward runs in a few milliseconds on one CPU thread.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH = 2


def conv_bn(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck; `groups` > 1 makes it a ResNeXt block (grouped 3x3)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNetBasic(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.layer1 = BasicBlock(12, 12)
        self.layer2 = BasicBlock(12, 20, stride=2)  # downsample shortcut
        self.fc = nn.Linear(20, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNetBottleneck(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.layer1 = Bottleneck(12, 6, 24)  # channel-changing shortcut
        self.layer2 = Bottleneck(24, 10, 24)  # identity shortcut
        self.layer3 = Bottleneck(24, 10, 20, stride=2)
        self.fc = nn.Linear(20, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNeXt(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.layer1 = Bottleneck(12, 24, 20, groups=4)  # 6 channels per conv group
        self.layer2 = Bottleneck(20, 24, 20, groups=8)  # 3 channels per conv group, identity shortcut
        self.layer3 = Bottleneck(20, 24, 28, stride=2, groups=4)
        self.fc = nn.Linear(28, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -------------------------------------------------------------------------------------------------- VGG


class VGG(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 10),
            conv_bn(10, 12),
            nn.MaxPool2d(2),
            conv_bn(12, 20),
            nn.MaxPool2d(2),
        )
        # 16x16 input -> 20 x 4 x 4 map flattened into the first Linear (repeat = 16 per channel)
        self.classifier = nn.Sequential(
            nn.Linear(20 * 4 * 4, 24),
            nn.BatchNorm1d(24),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(24, 18),
            nn.BatchNorm1d(18),
            nn.ReLU(),
            nn.Linear(18, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


# ------------------------------------------------------------------------------------------ MobileNetV2


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 12, 3, 1, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU6()),
            InvertedResidual(12, 10, 1, expand=1),  # no expansion conv
            InvertedResidual(10, 10, 1, expand=2),  # residual
            InvertedResidual(10, 20, 2, expand=3),
            InvertedResidual(20, 20, 1, expand=2),  # residual
            nn.Sequential(nn.Conv2d(20, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6()),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(24, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bottleneck: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bottleneck, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck)
        self.conv2 = nn.Conv2d(bottleneck, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(out)))


class DenseBlock(nn.Module):
    def __init__(self, cin: int, layers: int, growth: int, bottleneck: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth, bottleneck) for i in range(layers))

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)


class DenseNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 3, 1, 1, bias=False)
        self.block1 = DenseBlock(10, 2, growth=6, bottleneck=12)  # 10 + 6 + 6 = 22
        self.trans = nn.Sequential(
            nn.BatchNorm2d(22), nn.ReLU(), nn.Conv2d(22, 12, 1, bias=False), nn.AvgPool2d(2)
        )
        self.block2 = DenseBlock(12, 2, growth=6, bottleneck=12)  # 12 + 6 + 6 = 24
        self.norm = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.block2(self.trans(self.block1(self.stem(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1)
        return self.fc(torch.flatten(x, 1))


# ----------------------------------------------------------------------------------- squeeze-excitation


class SEConv(nn.Module):
    """SE with 1x1 convs as the fully connected layers."""

    def __init__(self, c: int, r: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class SELinear(nn.Module):
    """SE with Linear layers and a view back to N x C x 1 x 1."""

    def __init__(self, c: int, r: int):
        super().__init__()
        self.fc1 = nn.Linear(c, r)
        self.fc2 = nn.Linear(r, c)

    def forward(self, x):
        n, c = x.shape[:2]
        s = F.adaptive_avg_pool2d(x, 1).flatten(1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s.view(n, c, 1, 1)


class SENet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.block1 = conv_bn(3, 12)
        self.se1 = SEConv(12, 6)
        self.block2 = conv_bn(12, 20, stride=2)
        self.se2 = SELinear(20, 6)
        self.fc = nn.Linear(20, num_classes)

    def forward(self, x):
        x = self.se1(self.block1(x))
        x = self.se2(self.block2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------------------------------------------- UNet


class UNet(nn.Module):
    def __init__(self, out_channels: int = 3):
        super().__init__()
        self.enc1 = conv_bn(3, 10)  # 16x16
        self.enc2 = conv_bn(10, 20)  # 8x8
        self.mid = conv_bn(20, 24)  # 4x4
        self.up2 = nn.ConvTranspose2d(24, 12, 2, stride=2)  # -> 8x8
        self.dec2 = conv_bn(12 + 20, 12)
        self.up1 = nn.ConvTranspose2d(12, 6, 2, stride=2)  # -> 16x16
        self.dec1 = conv_bn(6 + 10, 10)
        self.head = nn.Conv2d(10, out_channels, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


# ------------------------------------------------------------------------------------------ 1d, 3d, MLP


class Conv1dNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(3, 10, 3, padding=1),
            nn.BatchNorm1d(10),
            nn.ReLU(),
            nn.Conv1d(10, 12, 3, stride=2, padding=1),
            nn.BatchNorm1d(12),
            nn.ReLU(),
            nn.Conv1d(12, 20, 3, padding=1),
            nn.BatchNorm1d(20),
            nn.ReLU(),
        )
        self.fc = nn.Linear(20, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool1d(self.features(x), 1).flatten(1))


class Conv3dNet(nn.Module):
    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(3, 6, 3, padding=1, bias=False),
            nn.BatchNorm3d(6),
            nn.ReLU(),
            nn.Conv3d(6, 10, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm3d(10),
            nn.ReLU(),
        )
        self.fc = nn.Linear(10, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool3d(self.features(x), 1).flatten(1))


class MLP(nn.Module):
    def __init__(self, din: int = 20, num_classes: int = 5):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(din, 24),
            nn.BatchNorm1d(24),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(24, 12),
            nn.ReLU(),
            nn.Linear(12, num_classes),
        )

    def forward(self, x):
        return self.net(x)


# ------------------------------------------------------------------------------------- rule exercisers


class BareParam(nn.Module):
    """A residual block whose branch is scaled by a bare [C, 1, 1] parameter (layer scale)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.conv = nn.Conv2d(12, 12, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((12, 1, 1), 0.5))
        self.conv_out = conv_bn(12, 20)
        self.fc = nn.Linear(20, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.gamma * self.conv(x)
        x = self.conv_out(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SplitChunk(nn.Module):
    """chunk and split along channels, parts to different convs, concatenated again."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.conv_a = conv_bn(6, 6)
        self.conv_b = conv_bn(6, 10)
        self.mix = conv_bn(16, 18)
        self.conv_c = conv_bn(4, 8)
        self.conv_d = conv_bn(14, 6)
        self.fc = nn.Linear(8 + 6, num_classes)

    def forward(self, x):
        x = self.stem(x)
        a, b = torch.chunk(x, 2, dim=1)  # 6 + 6
        x = self.mix(torch.cat([self.conv_a(a), self.conv_b(b)], 1))
        c, d = torch.split(x, [4, 14], dim=1)  # unequal parts
        x = torch.cat([self.conv_c(c), self.conv_d(d)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PReLUInstanceGroupNorm(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.gn1 = nn.GroupNorm(3, 12)
        self.act1 = nn.PReLU(num_parameters=12)
        self.conv2 = nn.Conv2d(12, 10, 3, padding=1)
        self.in2 = nn.InstanceNorm2d(10, affine=True)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(10, 20, 3, padding=1)
        self.gn3 = nn.GroupNorm(4, 20)
        self.act3 = nn.PReLU(num_parameters=20)
        self.fc = nn.Linear(20, num_classes)

    def forward(self, x):
        x = self.act1(self.gn1(self.conv1(x)))
        x = self.act2(self.in2(self.conv2(x)))
        x = self.act3(self.gn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DepthwiseMultiplier(nn.Module):
    """Depthwise conv with channel multiplier 2: out channel 2i and 2i+1 read input channel i."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = conv_bn(3, 6)
        self.dw = nn.Conv2d(6, 12, 3, padding=1, groups=6, bias=False)
        self.dw_bn = nn.BatchNorm2d(12)
        self.pw = conv_bn(12, 10, k=1)
        self.fc = nn.Linear(10, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.pw(F.relu(self.dw_bn(self.dw(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvTranspose1d3d(nn.Module):
    """Two inputs: a 1d branch and a 3d branch, each upsampling with ConvTranspose, joined by cat."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.c1 = nn.Conv1d(3, 10, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(10)
        self.up1 = nn.ConvTranspose1d(10, 12, 2, stride=2)
        self.bn1b = nn.BatchNorm1d(12)
        self.c3 = nn.Conv3d(3, 6, 3, padding=1)
        self.bn3 = nn.BatchNorm3d(6)
        self.up3 = nn.ConvTranspose3d(6, 10, 2, stride=2)
        self.bn3b = nn.BatchNorm3d(10)
        self.fc = nn.Linear(12 + 10, num_classes)

    def forward(self, x1, x3):
        a = F.relu(self.bn1b(self.up1(F.relu(self.bn1(self.c1(x1))))))
        b = F.relu(self.bn3b(self.up3(F.relu(self.bn3(self.c3(x3))))))
        a = F.adaptive_avg_pool1d(a, 1).flatten(1)
        b = F.adaptive_avg_pool3d(b, 1).flatten(1)
        return self.fc(torch.cat([a, b], 1))


# ------------------------------------------------------------------------------------------------- zoo


def _img(c: int = 3, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.randn(BATCH, c, h, w)


def _entry(cls: type[nn.Module], *shapes: tuple[int, ...]) -> Callable[[], tuple[nn.Module, tuple]]:
    def make() -> tuple[nn.Module, tuple]:
        return cls(), tuple(torch.randn(BATCH, *s) for s in shapes)

    make.__name__ = f"make_{cls.__name__}"
    return make


ZOO: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "resnet_basic": _entry(ResNetBasic, (3, 16, 16)),
    "resnet_bottleneck": _entry(ResNetBottleneck, (3, 16, 16)),
    "vgg": _entry(VGG, (3, 16, 16)),
    "mobilenet_v2": _entry(MobileNetV2, (3, 16, 16)),
    "densenet": _entry(DenseNet, (3, 16, 16)),
    "resnext": _entry(ResNeXt, (3, 16, 16)),
    "se_block": _entry(SENet, (3, 16, 16)),
    "unet": _entry(UNet, (3, 16, 16)),
    "conv1d_net": _entry(Conv1dNet, (3, 32)),
    "conv3d_net": _entry(Conv3dNet, (3, 8, 8, 8)),
    "mlp": _entry(MLP, (20,)),
    "bare_param": _entry(BareParam, (3, 12, 12)),
    "split_chunk": _entry(SplitChunk, (3, 12, 12)),
    "prelu_instancenorm_groupnorm": _entry(PReLUInstanceGroupNorm, (3, 12, 12)),
    "depthwise_multiplier": _entry(DepthwiseMultiplier, (3, 12, 12)),
    "conv_transpose_1d_3d": _entry(ConvTranspose1d3d, (3, 16), (3, 4, 4, 4)),
}

# Zoo models whose Torch-Pruning 1.6.1 group sizes are right: DependencyGraph builds, get_all_groups
# works, and each group is what the coupling rules say. TP builds on every zoo model, but on
# "depthwise_multiplier" it treats the Conv2d(6, 12, groups=6) as a grouped conv with in and out in
# separate groups (it only couples in/out when groups == out_channels), so its sizes differ from ours;
# on "split_chunk" it makes a group of the 18 channels cut by torch.split(x, [4, 14]), whose sizes are
# hard-coded in forward (pruning them breaks the model), which find_groups rightly leaves out.
# Finer lists (slot-level agreement, which TP regularizers run) are in tests/tp_oracle.py; the reasons
# are in notes/torch_pruning_behaviour.md.
ZOO_TP_COMPATIBLE: set[str] = set(ZOO) - {"depthwise_multiplier", "split_chunk"}


# -------------------------------------------------------------------------------------------- helpers

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial running statistics and affine parameters, in place.

    With the default init (mean 0, var 1, weight 1, bias 0) a BatchNorm in eval mode is the identity,
    which would hide a running statistic sliced at the wrong index. Also randomizes PReLU slopes.
    """
    g = torch.Generator().manual_seed(seed)

    def fill(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float32).to(t.dtype) * (hi - lo) + lo)

    for m in model.modules():
        if isinstance(m, _NORMS):
            if getattr(m, "weight", None) is not None:
                fill(m.weight, 0.5, 1.5)
            if getattr(m, "bias", None) is not None:
                fill(m.bias, -0.3, 0.3)
            if getattr(m, "running_mean", None) is not None:
                fill(m.running_mean, -0.3, 0.3)
            if getattr(m, "running_var", None) is not None:
                fill(m.running_var, 0.5, 2.0)
        elif isinstance(m, nn.PReLU):
            fill(m.weight, 0.05, 0.4)
    return model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
