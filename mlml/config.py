"""Typed run configuration: dataclasses loaded from TOML and overridden from the command line.

    cfg = load_config("experiments/configs/quick.toml", ["optim.lr=3e-4", "method.loss=an"])

Unknown keys and values of the wrong type raise `ConfigError` naming the dotted key. The resolved
config is written to every run directory (`config.toml`) and stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlml.data.synthetic import SyntheticConfig


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type."""


@dataclass
class RunConfig:
    experiment: str = "default"   # runs/<experiment>/<setting>/<method>/seed<k>/
    setting: str = "default"
    method_label: str = ""        # name of the run's method in tables; "" -> method.name/method.loss
    seed: int = 0                 # model initialisation, data order, augmentation
    out_dir: str = "runs"
    device: str = "auto"          # auto | cpu | cuda | cuda:1
    threads: int = 0              # torch CPU threads; 0 = leave torch's default
    progress: bool = True         # tqdm progress bar
    checkpoint_every: int = 0     # also write last.pt every N optimiser steps; 0 = at epoch ends only
    dist_timeout: float = 1800.0  # seconds a collective waits for the other ranks before failing


@dataclass
class DataConfig:
    source: str = "synthetic"
    n_train: int = 6000
    n_val: int = 1500
    n_test: int = 3000
    data_seed: int = 0            # fixes the images and which labels are observed, across runs
    observation: str = "auto"     # auto (the source's default: single_positive for synthetic data,
                                  # annotated for folders and annotation files) | full | single_positive
                                  # | partial | per_group | unlabelled | annotated
    observation_args: dict = field(default_factory=dict)
    val_labels: str = "full"      # full | observed: what validation metrics (and model selection) see
    augment: str = "flip_crop"    # none | flip_crop (the weak view; methods may ask for "strong" too)
    batch_size: int = 128         # global batch per optimiser step: split over ranks, then micro-batches
    # With unlabelled training images (observation_args.labelled_fraction < 1): unlabelled images per
    # labelled one in each batch; 0 trains on the labelled images only. See MixedBatchSampler.
    unlabelled_ratio: float = 0.0
    num_workers: int = 0
    groups: dict = field(default_factory=dict)   # group name -> overrides of the source's groups (mlml.labels.configure_groups)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    root: str = ""                # folder, recolour: the folder of class folders; annotations: what
                                  # image paths are relative to ("" = the annotation file's folder)
    annotations: str = ""         # annotations (and recolour over annotations): .csv or .jsonl file
    label_names: str = ""         # annotations: .txt or .json label names file
    image_size: int = 64          # file sources: images decoded to (3, S, S), centre square
    store: str = ""               # file sources: index cache directory ("" = under $MLML_CACHE)
    colours: int = 6              # recolour: number of colour classes (see mlml.data.recolour)
    strict: bool = False          # an unreadable image stops the run (default: skipped and counted)
    # source = "mixed" (mlml.data.mixed): these sources concatenated, each image's domain its source's index
    mixed: list[str] = field(default_factory=list)         # e.g. ["synthetic", "annotations"]
    mixed_eval: int = -1          # validation and test images come from this member (-1: the last)
    mixed_train: list[int] = field(default_factory=list)   # training images per member ([] = at random from all)
    mixed_unlabelled: list[int] = field(default_factory=list)  # members whose training images carry no labels


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"   # see mlml.models.BACKBONES
    width: int = 32               # small_cnn channel width
    stem: str = "small"           # resnets: small (3x3 conv, no max-pool) | imagenet
    weights: str = ""             # path of a local state_dict for the backbone; "" = random init
    head: str = "linear"
    dropout: float = 0.0
    sync_bn: bool = False         # torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)
    find_unused_parameters: bool = False   # DDP: allow parameters without gradient in a step (or the method says so)


@dataclass
class MethodConfig:
    name: str = "supervised"      # see mlml.methods.METHODS
    loss: str = "an"              # see mlml.losses.LOSSES
    loss_args: dict = field(default_factory=dict)
    pos_weight: str = "none"      # none | observed: estimate per-class pos_weight from observed labels
    args: dict = field(default_factory=dict)   # method-specific hyperparameters
    # adversarial domain branch for any method: {weight, hidden, schedule, lambda_max, gamma};
    # empty or weight 0 = off (see mlml/methods/domain.py)
    domain_branch: dict = field(default_factory=dict)
    # EMA teacher for any method: {decay, weight, rampup, thresholds...}; empty = off (mlml/methods/teacher.py)
    teacher: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "adamw"           # adamw | sgd
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    epochs: int = 15
    warmup_epochs: float = 1.0
    schedule: str = "cosine"      # cosine | constant
    grad_clip: float = 0.0        # max grad norm; 0 = off
    accumulate: int = 1           # micro-batches per optimiser step (gradient accumulation)
    amp: str = "auto"             # auto (on for CUDA) | on | off


@dataclass
class EvalConfig:
    every: int = 1                # evaluate on validation every N epochs
    select: str = "val/mAP_macro" # metric choosing best.pt; test metrics use the best checkpoint
    threshold: float = 0.5        # fixed threshold for F1/Hamming (calibrated ones are reported too)
    image_grid: int = 16          # test images logged to TensorBoard with true and predicted labels


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def method_label(self) -> str:
        if self.run.method_label:
            return self.run.method_label
        label = self.method.loss if self.method.name == "supervised" else f"{self.method.name}-{self.method.loss}"
        return label + ("+teacher" if self.method.teacher else "")


def run_dir_for(cfg: Config) -> Path:
    """runs/<experiment>/<setting>/<method>/seed<k>/ (docs/design.md, "Run directory")."""
    return Path(cfg.run.out_dir) / cfg.run.experiment / cfg.run.setting / cfg.method_label() / f"seed{cfg.run.seed}"


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or '<root>'}' must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; known: {', '.join(sorted(names))}")
    kwargs = {k: _convert(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _convert(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(arg, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' = {value!r} does not match {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a table, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is type(None) and value is None:
        return None
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=3e-4' -> (['optim', 'lr'], 0.0003). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def merge(base: dict, path: list[str], value: Any) -> None:
    """Set `base[path[0]][path[1]]... = value`, creating tables on the way."""
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(path)}': '{part}' is not a table")
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file (which may name a `base` file), then `key=value` overrides."""
    data = read_toml_with_bases(Path(path)) if path else {}
    for text in overrides:
        merge(data, *parse_override(text))
    from mlml.settings import validate   # the components' settings (mlml/settings.py)
    return validate(from_dict(Config, data), path, overrides)


def read_toml_with_bases(path: Path) -> dict:
    """Read `path`; a top-level `base = "other.toml"` (relative to it) is read first and updated."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from None
    base = data.pop("base", None)
    if base is None:
        return data
    merged = read_toml_with_bases(path.parent / base)
    deep_update(merged, data)
    return merged


def deep_update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in ("loss_args", "args", "observation_args", "domain_branch", "teacher"):
            deep_update(base[k], v)
        else:
            base[k] = v


def to_toml(data: dict) -> str:
    """Serialise a nested dict of TOML-compatible values (tables, scalars, lists, inline tables)."""
    lines: list[str] = []
    _write_table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _write_table(data: dict, path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if not _is_table(k, v)}
    tables = {k: v for k, v in data.items() if _is_table(k, v)}
    if path:
        lines.append(f"\n[{'.'.join(path)}]")
    lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
    for k, v in tables.items():
        _write_table(v, path + [k], lines)


def _is_table(key: str, value: Any) -> bool:
    # Free-form dict fields are written inline so they read back as the same dict.
    return isinstance(value, dict) and key not in ("loss_args", "args", "observation_args", "domain_branch", "teacher")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if v == v and abs(v) != float("inf") else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        raise ConfigError("TOML has no null; use an empty string or leave the key out")
    raise ConfigError(f"cannot write {v!r} to TOML")
