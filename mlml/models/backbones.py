"""Backbones: image (B, 3, H, W) -> features (B, D). A registry of factories.

Every factory takes the `ModelConfig` and returns an `nn.Module` with an `out_dim` attribute; its
own settings (`model.backbone_args`) are a dataclass in the factory's `Settings` attribute, which
the factory resolves (`mlml.settings.resolve`; `NoSettings` when it takes none).
Pretrained weights are never downloaded: `model.weights` names a local file, in mlml's safe weight
format (`mlml weights convert`, `mlml/models/weights.py`) or a plain state_dict (torchvision's).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from mlml.config import ModelConfig
from mlml.registry import Registry
from mlml.settings import NoSettings

BACKBONES: Registry = Registry("backbone", entry_point_group="mlml.backbones")


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU layers with two poolings: the CPU default for 16-64 px images.

    Costs about 11 MMAC per 32 px image at width 24, so a 2-core laptop trains ~1-2k images/s.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn_relu(3, w), nn.MaxPool2d(2),            # (B, w, H/2, W/2)
            conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),        # (B, 2w, H/4, W/4)
            conv_bn_relu(2 * w, 4 * w),
            conv_bn_relu(4 * w, 4 * w),                     # (B, 4w, H/4, W/4)
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),          # (B, 4w)
        )
        self.out_dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv layer's output (B, 4w, H/4, W/4), before the global average pool."""
        return self.features[:-2](x)


@BACKBONES.register("small_cnn")
def small_cnn(cfg: ModelConfig) -> nn.Module:
    return SmallCNN(cfg.width)


small_cnn.Settings = NoSettings


def _resnet(arch: str, cfg: ModelConfig) -> nn.Module:
    net = getattr(torchvision.models, arch)(weights=None)
    if cfg.stem == "small":  # 32-64 px images: a 3x3 stride-1 stem and no max-pool (CIFAR-style)
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif cfg.stem != "imagenet":
        raise ValueError(f"unknown model.stem '{cfg.stem}'; known: imagenet, small")
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


@BACKBONES.register("resnet18")
def resnet18(cfg: ModelConfig) -> nn.Module:
    return _resnet("resnet18", cfg)


@BACKBONES.register("resnet50")
def resnet50(cfg: ModelConfig) -> nn.Module:
    return _resnet("resnet50", cfg)


resnet18.Settings = resnet50.Settings = NoSettings


def feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's spatial features (B, D, h, w), whose mean over (h, w) is `backbone(x)` (B, D).

    For heads that score every location (a class activation map, `model.boostlu`): a backbone
    provides it as a `feature_map(x)` method; torchvision's ResNets are read up to `layer4`.
    """
    if hasattr(backbone, "feature_map"):
        return backbone.feature_map(x)
    if isinstance(backbone, torchvision.models.ResNet):
        b = backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))
    raise ValueError(f"backbone {type(backbone).__name__} has no feature_map(x) -> (B, D, h, w), which "
                     "model.boostlu needs; give it one or set model.boostlu = 1")


def load_backbone_weights(backbone: nn.Module, path: str, name: str) -> None:
    """Load `model.weights` into `backbone` (registered as `name`).

    A file in mlml's safe weight format (`mlml weights convert`) is loaded strictly
    (`mlml.models.weights.load_weights`: every key, with its shape, or an error naming the key). A
    plain state_dict (a torchvision checkpoint, our own backbone's) is loaded with
    `weights_only=True`, taking the tensors whose key and shape match (keys prefixed `backbone.` or
    `module.` are accepted; an ImageNet stem is skipped for a small stem); none matching is an error.
    """
    from mlml.checkpoint import MAGIC
    from mlml.models.weights import load_weights

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model.weights: no file at {file}")
    with open(file, "rb") as f:
        if f.read(len(MAGIC)) == MAGIC:
            load_weights(backbone, file, name)
            return
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    own = backbone.state_dict()
    cleaned = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone."):
            k = k.removeprefix(prefix)
        if k in own and own[k].shape == v.shape:
            cleaned[k] = v
    if not cleaned:
        raise ValueError(f"model.weights: no tensor in {file} matches the backbone's parameters "
                         "(a package's weight file? convert it first: mlml weights convert)")
    backbone.load_state_dict(cleaned, strict=False)
