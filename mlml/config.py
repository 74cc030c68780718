"""Typed run configuration: dataclasses loaded from TOML and overridden from the command line.

    cfg = load_config("experiments/configs/quick.toml", ["optim.lr=3e-4", "method.loss=an"])

Unknown keys, values of the wrong type and values out of range (`validate_config`: epochs >= 1,
lr > 0, a known schedule and selection metric, ...) raise a one-line `ConfigError` naming the dotted
key and where the value came from (the file, or the `--set` override), when the config is loaded:
before any data are built or anything is trained. The resolved config is written to every run
directory (`config.toml`) and stored in every checkpoint; `config_hash` identifies it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type or is out of range.

    Args:
        message: what is wrong; line breaks are escaped, so the error is always one line.
        key: the dotted config key at fault, when there is one (used to say where it came from).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))
        self.key = key


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
    checkpoint_minutes: float = 0.0   # also write last.pt when this many minutes passed since the last one; 0 = off
    dist_timeout: float = 1800.0  # seconds a collective waits for the other ranks before failing


@dataclass
class DataConfig:
    """`[data]`: what every source shares. A source's own settings live in the table named after it
    (`[data.synthetic]`, `[data.annotations]`, a plug-in's `[data.<name>]`), typed by the settings
    dataclass beside the source (`mlml.settings.source_settings_class`) and held in `sources`."""

    # Tables of `[data]` that are not keys of its own: each is the settings table of the source of its name.
    NESTED: ClassVar[str] = "sources"

    source: str = "synthetic"     # see `mlml list sources`; its settings: [data.<source>]
    n_train: int = 6000           # split sizes; a source with its own splits is capped at them (a random
    n_val: int = 1500             # subset of data_seed), -1 = the whole split
    n_test: int = 3000
    data_seed: int = 0            # fixes the images and which labels are observed, across runs
    observation: str = "auto"     # auto (the source's default: single_positive for synthetic data,
                                  # annotated for folders and annotation files) | full | single_positive
                                  # | partial | per_group | unlabelled | annotated
    observation_args: dict = field(default_factory=dict)
    val_labels: str = "full"      # full | observed: what validation metrics (and model selection) see
    augment: str = "flip_crop"    # none | flip_crop | crop (the weak view; methods may ask for "strong" too)
    batch_size: int = 128         # global batch per optimiser step: split over ranks, then micro-batches
    # With unlabelled training images (observation_args.labelled_fraction < 1, or a mixed source's
    # unlabelled members): unlabelled images per labelled one in each batch; 0 trains on the labelled
    # images only. See MixedBatchSampler.
    unlabelled_ratio: float = 0.0
    # within: batch_size images per step, split labelled : unlabelled = 1 : unlabelled_ratio (the
    # labelled stream shrinks as the ratio grows) | added: batch_size labelled images plus
    # unlabelled_ratio x batch_size unlabelled ones (FixMatch's B and mu B: the labelled stream is
    # that of supervised-only training whatever the ratio)
    unlabelled_batch: str = "within"
    num_workers: int = 0
    groups: dict = field(default_factory=dict)   # group name -> overrides of the source's groups (mlml.labels.configure_groups)
    split_file: str = ""          # file sources: .csv (path,split) or .json ({split: [paths]}) fixing the splits
    eval_labels: str = "auto"     # complete | annotated (metrics on listed positives and negatives only) |
                                  # auto (annotated when the source lists negatives, else complete)
    store: str = ""               # file sources: index cache directory ("" = under $MLML_CACHE)
    strict: bool = False          # an unreadable image stops the run (default: skipped and counted)
    # source name -> its settings ([data.<name>]): the tables the config gives and those of the sources
    # it uses, resolved into their dataclasses when the config is loaded (`mlml.settings.resolve_sources`).
    sources: dict[str, Any] = field(default_factory=dict)

    def settings(self, source: str | None = None) -> Any:
        """The resolved settings of `source` (default: `data.source`), its defaults when the config sets none."""
        return importlib.import_module("mlml.settings").source_settings(self, source or self.source)


# Keys of `[data]` before source settings moved into `[data.<source>]`: old key -> its new spelling
# ("<source>" = the configured source, or the member source that reads it). Stored configs of older
# runs are upgraded (`mlml.settings.upgrade_stored_config`); a config file that uses them is an error.
MOVED_DATA_KEYS = {
    "root": "data.<source>.root",
    "annotations": "data.<source>.file",
    "label_names": "data.<source>.label_names",
    "image_size": "data.<source>.image_size",
    "allow_outside_root": "data.<source>.allow_outside_root",
    "confidence_threshold": "data.tencent.confidence_threshold",
    "colours": "data.recolour.colours",
    "mixed": "data.mixed.sources",
    "mixed_eval": "data.mixed.eval",
    "mixed_train": "data.mixed.train",
    "mixed_unlabelled": "data.mixed.unlabelled",
}
SPLIT_NAMES = ("train", "val", "test")


def moved_data_key(key: str, value: Any, source: str) -> str | None:
    """The new spelling of `data.<key>` when it is an old flat key of a source's settings, else None.

    `annotations` and `mixed` are also source names: their tables are new spellings, a string,
    a list or a table of split files the old ones.
    """
    if key not in MOVED_DATA_KEYS:
        return None
    if key in ("annotations", "mixed") and isinstance(value, dict) and not (key == "annotations" and value and set(value) <= set(SPLIT_NAMES)):
        return None
    if source == "voc" and key == "annotations":
        return "data.voc.image_sets"
    reader = source if source not in ("synthetic", "mixed", "recolour") else "annotations"   # a file source reads it
    return MOVED_DATA_KEYS[key].replace("<source>", reader)


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"   # see mlml.models.BACKBONES
    width: int = 32               # small_cnn channel width
    stem: str = "small"           # resnets: small (3x3 conv, no max-pool) | imagenet
    backbone_args: dict = field(default_factory=dict)   # the backbone's own settings (its `Settings`, `mlml list backbones`)
    weights: str = ""             # backbone weights: a file of `mlml weights convert` or a plain state_dict; "" = random init
    head: str = "linear"
    dropout: float = 0.0
    boostlu: float = 1.0          # BoostLU (Kim et al., CVPR 2023): positive class-activation-map entries x this before pooling; 1 = off
    sync_bn: bool = False         # torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)
    find_unused_parameters: bool = False   # DDP: allow parameters without gradient in a step (or the method says so)
    compile: bool = False         # torch.compile the training forward (GPU; the first steps compile, minutes)


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
    amp: str = "auto"             # auto (on for CUDA) | on (CUDA, and bf16 on a CPU) | off


@dataclass
class EvalConfig:
    every: int = 1                # evaluate on validation every N epochs
    select: str = "val/mAP_macro" # metric choosing best.pt; test metrics use the best checkpoint
    threshold: float = 0.5        # fixed threshold for F1/Hamming (calibrated ones are reported too)
    min_positives: int = 1        # data.eval_labels = annotated: classes with fewer annotated positives are reported apart
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
        """The config as nested dicts, spelled as in TOML: each source's settings under `data.<source>`."""
        out = dataclasses.asdict(self)
        out["data"] = nest_tables(DataConfig, out["data"])
        return out

    def method_label(self) -> str:
        if self.run.method_label:
            return self.run.method_label
        label = self.method.loss if self.method.name == "supervised" else f"{self.method.name}-{self.method.loss}"
        return label + ("+teacher" if self.method.teacher else "")


def run_dir_for(cfg: Config) -> Path:
    """runs/<experiment>/<setting>/<method>/seed<k>/ (docs/design.md, "Run directory")."""
    return Path(cfg.run.out_dir) / cfg.run.experiment / cfg.run.setting / cfg.method_label() / f"seed{cfg.run.seed}"


# Tables whose keys are free (their owner checks them); written inline and replaced, not merged.
FREE_FORM = ("loss_args", "args", "observation_args", "domain_branch", "teacher", "backbone_args")

# Keys that say how a run is executed, not what it computes: they may differ between runs of one
# config (and are left out of `config_hash`).
EXECUTION_KEYS = ("run.threads", "run.progress", "run.out_dir", "run.checkpoint_every", "run.checkpoint_minutes",
                  "run.dist_timeout", "data.store")


def nest_tables(cls: type, data: dict) -> dict:
    """`data` (a dict of dataclass `cls`) with its `NESTED` dict's entries as tables of their own names."""
    nested = getattr(cls, "NESTED", None)
    if not nested:
        return data
    return {**{k: v for k, v in data.items() if k != nested}, **data.get(nested, {})}


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and type.

    A class with `NESTED` (the name of a dict field) takes every table that is not one of its keys
    into that field, by name (`[data.synthetic]` -> `DataConfig.sources["synthetic"]`); their owners
    check them (`mlml.settings.resolve_sources`).
    """
    if not isinstance(data, dict):
        key = prefix.rstrip(".") or "<root>"
        raise ConfigError(f"'{key}' must be a table, got {type(data).__name__}", key)
    hints = typing.get_type_hints(cls)
    nested = getattr(cls, "NESTED", None)
    names = {f.name for f in dataclasses.fields(cls)} - {nested}
    if nested:
        data = _collect_tables(cls, data, names, prefix)
    unknown = sorted(set(data) - names - {nested}, key=str)
    if unknown:
        tables = f"; or the table of a source: [{prefix}<source>]" if nested else ""
        raise ConfigError(f"unknown config key {prefix + str(unknown[0])!r}; known: {', '.join(sorted(names))}{tables}",
                          prefix + str(unknown[0]))
    kwargs = {k: _convert(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:      # a dataclass's own checks (__post_init__)
        key = prefix.rstrip(".") or "<root>"
        raise ConfigError(f"config table '{key}': {err}", key) from None


def _collect_tables(cls: type, data: dict, names: set[str], prefix: str) -> dict:
    """`data` with the tables that are not keys of `cls` gathered into its `NESTED` field; an old flat
    key of a source's settings (`data.image_size`) is an error naming its new spelling."""
    source = data.get("source", "synthetic")
    tables = {}
    for key, value in data.items():
        if key in names:
            continue
        moved = moved_data_key(str(key), value, str(source)) if cls is DataConfig else None
        if moved:
            raise ConfigError(f"config key '{prefix}{key}' has moved into the table of the source that reads it: "
                              f"write '{moved}' (see mlml list sources)", prefix + str(key))
        if isinstance(value, dict):
            tables[key] = value
    rest = {k: v for k, v in data.items() if k not in tables}
    return {**rest, cls.NESTED: tables} if tables else rest


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
        raise ConfigError(f"config key '{key}' = {value!r} does not match {tp}", key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}", key)
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a table, got {value!r}", key)
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is type(None) and value is None:
        return None
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}", key)
    return value


# ------------------------------------------------------------------ validation (at load time)
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine")
AMP_MODES = ("auto", "on", "off")

Check = tuple[Callable[[Any], bool], str]   # (predicate on the value, what it requires)


def _at_least(lo: float) -> Check:
    return (lambda v: v >= lo), f">= {lo}"


def _above(lo: float) -> Check:
    return (lambda v: v > lo), f"> {lo}"


def _within(lo: float, hi: float, hi_open: bool = False) -> Check:
    return (lambda v: lo <= v < hi if hi_open else lo <= v <= hi), f"in [{lo}, {hi}{')' if hi_open else ']'}"


def _one_of(*choices: str) -> Check:
    return (lambda v: v in choices), f"one of {', '.join(choices)}"


def _path_part(v: str) -> bool:
    """A run directory component: not empty, '.' or '..', no separator (runs/<experiment>/<setting>/...)."""
    return v not in ("", ".", "..") and not any(c in v for c in "/\\")


def _device(v: str) -> bool:
    import torch

    try:
        return v == "auto" or torch.device(v).type in ("cpu", "cuda", "mps")
    except (RuntimeError, ValueError, TypeError):
        return False


# Dotted key -> range or choice. Free-form tables (loss_args, args, ...) are checked by their owners.
CHECKS: dict[str, Check] = {
    "run.experiment": (_path_part, "a non-empty name without '/' (it is a run directory)"),
    "run.setting": (_path_part, "a non-empty name without '/' (it is a run directory)"),
    "run.method_label": (lambda v: v == "" or _path_part(v), "empty or a name without '/' (it is a run directory)"),
    "run.seed": _within(0, 2**32, hi_open=True),             # numpy's seed range
    "run.device": (_device, "auto, cpu, cuda or cuda:<index>"),
    "run.threads": _at_least(0),
    "run.checkpoint_every": _at_least(0),
    "run.checkpoint_minutes": _at_least(0),
    "run.dist_timeout": _above(0),
    "data.n_train": (lambda v: v >= 1 or v == -1, ">= 1, or -1: the whole split of a source with splits of its own"),
    "data.n_val": (lambda v: v >= 1 or v == -1, ">= 1 (validation selects the best epoch and calibrates thresholds), "
                                                 "or -1: the whole split of a source with splits of its own"),
    "data.n_test": (lambda v: v >= 1 or v == -1, ">= 1, or -1: the whole split of a source with splits of its own"),
    "data.data_seed": _within(0, 2**32, hi_open=True),
    "data.val_labels": _one_of("full", "observed"),
    "data.eval_labels": _one_of("auto", "complete", "annotated"),
    "data.batch_size": _at_least(1),
    "data.unlabelled_ratio": _at_least(0),
    "data.unlabelled_batch": _one_of("within", "added"),
    "data.num_workers": _at_least(0),
    "model.width": _at_least(1),
    "model.stem": _one_of("small", "imagenet"),
    "model.dropout": _within(0, 1, hi_open=True),
    "model.boostlu": _above(0),
    "method.pos_weight": _one_of("none", "observed"),
    "optim.name": _one_of(*OPTIMIZERS),
    "optim.lr": _above(0),
    "optim.weight_decay": _at_least(0),
    "optim.momentum": _within(0, 1, hi_open=True),
    "optim.epochs": _at_least(1),
    "optim.warmup_epochs": _at_least(0),
    "optim.schedule": _one_of(*SCHEDULES),
    "optim.grad_clip": _at_least(0),
    "optim.accumulate": _at_least(1),
    "optim.amp": _one_of(*AMP_MODES),
    "eval.every": _at_least(1),
    "eval.threshold": _within(0, 1),
    "eval.image_grid": _at_least(0),
    "eval.min_positives": _at_least(1),
}

# Dotted key -> (module, registry) of the names it may take (plug-ins included).
REGISTRY_KEYS = {
    "data.source": ("mlml.data.pipeline", "SOURCES"),
    "data.augment": ("mlml.data.transforms", "TRANSFORMS"),
    "data.observation": ("mlml.data.observation", "OBSERVATIONS"),
    "model.backbone": ("mlml.models.backbones", "BACKBONES"),
    "model.head": ("mlml.models.model", "HEADS"),
    "method.name": ("mlml.methods", "METHODS"),
    "method.loss": ("mlml.losses", "LOSSES"),
}


def flat(d: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; free-form tables (loss_args, ...) stay values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in FREE_FORM:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def validate_config(cfg: Config) -> Config:
    """Check every value's range, choice and consistency; raises `ConfigError` naming the key.

    Called by `load_config` (and by `train`), so a bad value stops the run before data are built.
    Checks that need the data (a selection metric's group, a method's extra evaluated models)
    are made once they are built, still before training (`mlml.evaluation.check_selection`).
    """
    values = flat(cfg.to_dict())
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' = {value!r} must be a finite number", key)
        if isinstance(value, str) and "\x00" in value:
            raise ConfigError(f"config key '{key}' = {value!r} contains a NUL character", key)
    for key, (ok, wanted) in CHECKS.items():
        if not ok(values[key]):
            raise ConfigError(f"config key '{key}' = {values[key]!r} must be {wanted}", key)
    importlib.import_module("mlml.settings").check_components(cfg)   # components' and sources' settings (mlml/settings.py)
    for key, (module, attr) in REGISTRY_KEYS.items():
        registry = getattr(importlib.import_module(module), attr)
        names = values[key] if isinstance(values[key], list) else [values[key]]
        for name in names:
            if name not in registry and not (key == "data.observation" and name == "auto"):
                raise ConfigError(f"config key '{key}' = {name!r} is unknown; known: {', '.join(registry.names())}", key)
    if cfg.data.batch_size % cfg.optim.accumulate:
        raise ConfigError(f"config key 'data.batch_size' = {cfg.data.batch_size} must be divisible by "
                          f"optim.accumulate = {cfg.optim.accumulate} (micro-batches per step)", "data.batch_size")
    from mlml.evaluation import check_selection

    check_selection(cfg.eval.select, full_labels=cfg.data.val_labels == "full")
    return cfg


def config_hash(cfg: Config | dict) -> str:
    """A stable hash (16 hex digits) of what the config computes: every key but `EXECUTION_KEYS`.

    Two configs with the same hash train the same run; it is recorded in `metrics.json` (and
    checkpoints) to tell runs of different configs apart.
    """
    values = {k: v for k, v in flat(cfg.to_dict() if isinstance(cfg, Config) else cfg).items() if k not in EXECUTION_KEYS}
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_diff(a: Config | dict, b: Config | dict, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (value in a, value in b) for every key that differs (but `ignore`)."""
    fa, fb = (flat(c.to_dict() if isinstance(c, Config) else c) for c in (a, b))
    return {k: (fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys()) if k not in ignore and fa.get(k) != fb.get(k)}


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=3e-4' -> (['optim', 'lr'], 0.0003). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not all(key.split(".")):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted config key")
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
            raise ConfigError(f"config key '{'.'.join(path)}': '{part}' is not a table", ".".join(path))
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = (), stored: bool = False) -> Config:
    """Defaults, then the TOML file (which may name a `base` file), then `key=value` overrides.

    The result is validated (`validate_config`); an error names the key and where its value came
    from: the file (or base file) that set it, or the `--set` override. `stored`: the file is the
    `config.toml` a run wrote, perhaps under an older mlml: keys that have moved since are upgraded
    (`mlml.settings.upgrade_stored_config`) rather than refused.
    """
    files: list[tuple[Path, dict]] = []
    data = read_toml_with_bases(Path(path), files) if path else {}
    if stored:
        data = importlib.import_module("mlml.settings").upgrade_stored_config(data)
    parsed = [(text, *parse_override(text)) for text in overrides]
    for text, key, value in parsed:
        try:
            merge(data, key, value)
        except ConfigError as err:
            raise ConfigError(f"--set {text}: {err}", err.key) from None
    try:
        return validate_config(from_dict(Config, data))
    except ConfigError as err:
        raise ConfigError(f"{_origin(err.key, files, parsed)}: {err}", err.key) from None


def _origin(key: str | None, files: list[tuple[Path, dict]], overrides: list[tuple[str, list[str], Any]]) -> str:
    """Where the value of dotted `key` came from: the last override that set it, else the file that
    did; a key of a source's table that nothing set (a required one) comes from `data.source`."""
    if not key:
        return str(files[0][0]) if files else "config"
    parts = key.split("[")[0].split(".")
    for text, path, _ in reversed(overrides):
        if path[: len(parts)] == parts or parts[: len(path)] == path:
            return f"--set {text}"
    for file, raw in files:                      # the file itself first, then its bases
        node: Any = raw
        for part in parts:
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return str(file)
    if parts[0] == "data" and len(parts) > 2:
        return _origin("data.source", files, overrides)
    return str(files[0][0]) if files else "config"


def read_toml_with_bases(path: Path, files: list[tuple[Path, dict]] | None = None) -> dict:
    """Read `path`; a top-level `base = "other.toml"` (relative to it) is read first and updated.

    `files` (if given) receives (file, its own table) for `path` and then each base, in that order.
    """
    files = [] if files is None else files
    if any(path.resolve() == f.resolve() for f, _ in files):
        raise ConfigError(f"{path}: 'base' makes a cycle ({' -> '.join(str(f) for f, _ in files)} -> {path})", "base")
    try:
        with open(path, "rb") as f:
            data = tomllib.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: arrays or tables nested too deeply") from None
    files.append((path, dict(data)))
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base or "\x00" in base:
        raise ConfigError(f"{path}: 'base' must be the path of another TOML file, got {base!r}", "base")
    merged = read_toml_with_bases(path.parent / base, files)
    deep_update(merged, data)
    return merged


def deep_update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in FREE_FORM:
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
        lines.append(f"\n[{'.'.join(_toml_key(p) for p in path)}]")
    lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars.items())
    for k, v in tables.items():
        _write_table(v, path + [k], lines)


def _is_table(key: str, value: Any) -> bool:
    # Free-form dict fields are written inline so they read back as the same dict.
    return isinstance(value, dict) and key not in FREE_FORM


def _toml_key(key: str) -> str:
    """A bare key when TOML allows one, else a quoted key."""
    return key if key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key) else _toml_value(key)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if v == v and abs(v) != float("inf") else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):        # a TOML basic string: JSON's escapes, and DEL escaped too
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        raise ConfigError("TOML has no null; use an empty string or leave the key out")
    raise ConfigError(f"cannot write {v!r} to TOML")
