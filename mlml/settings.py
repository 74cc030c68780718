"""Typed settings of components, resolved and checked when the config is loaded.

Every configurable component declares its settings beside itself as a dataclass named `Settings`
(a class attribute): a method (`method.args`), the teacher (`method.teacher`), the domain branch
(`method.domain_branch`), an observation model (`data.observation_args`), a backbone
(`model.backbone_args`, on its factory). A loss declares them as
its keyword parameters: `fn(logits, targets, observed, q: float = 0.05)` has the settings
`{q: float = 0.05}` (`signature_settings`), so there is no second list to keep in step. A data
source factory `fn(data: DataConfig, settings: S) -> source` declares them as the dataclass `S`
annotating its second parameter (or a `Settings` attribute); they are the table named after the
source, `[data.<name>]` (`resolve_sources`).

`load_config` (through `mlml.config.validate_config`) calls `check_components`, which looks up
every named component and resolves its table into its dataclass before any data are built: an
unknown key, a value of the wrong type or out of range is one `ConfigError` naming the dotted key,
and `load_config` adds where it came from (the config file or the `--set` override). Components
resolve their settings again, with the same function (`resolve`), when they are built. A plug-in
without a `Settings` class gets its table as a dict.

Range checks live in the dataclass's `__post_init__`, written with `must(ok, name, rule, value)`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Iterable

from mlml.config import Config, ConfigError, DataConfig, from_dict


class SettingError(Exception):
    """A settings value out of its range; `name` is the field, `message` what it must be.

    Not a `ValueError`, so that it reaches `resolve` (which names the dotted key) through
    `mlml.config.from_dict`."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name} {message}")
        self.name, self.message = name, message


class SettingsError(ConfigError):
    """A config mistake in a component's settings; `key` is the dotted config key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message, key)


def must(ok: bool, name: str, rule: str, value: Any) -> None:
    """Raise `SettingError` "<name> must be <rule>, got <value>" unless `ok` (for `__post_init__`)."""
    if not ok:
        raise SettingError(name, f"must be {rule}, got {value!r}")


def one_of(value: Any, name: str, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    must(value in choices, name, " or ".join(repr(c) for c in choices), value)


@dataclass
class NoSettings:
    """The settings of a component that has none: any key is an error."""


def signature_settings(fn: Any, skip: int = 3, exclude: tuple[str, ...] = ()) -> type | None:
    """A dataclass of `fn`'s parameters after the first `skip`, with their annotations and defaults.

    A loss's settings are its keyword parameters (after logits, targets, observed). None when `fn`
    takes `**kwargs` (anything goes: its table is passed as a dict).
    """
    return _signature_settings(fn, skip, tuple(exclude))


@functools.cache
def _signature_settings(fn: Any, skip: int, exclude: tuple[str, ...]) -> type | None:
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:             # annotations that do not evaluate: accept any value
        hints = {}
    fields = []
    for p in params:
        if p.name in exclude or p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        tp = hints.get(p.name, Any)
        fields.append((p.name, tp) if p.default is p.empty else (p.name, tp, dataclasses.field(default=p.default)))
    name = getattr(fn, "__name__", "loss")
    return dataclasses.make_dataclass(f"{name}_settings", fields)


def settings_class(component: Any) -> type | None:
    """The settings dataclass of a registered component: its `Settings` attribute or, for a plain
    function (a loss), one derived from its keyword parameters; None when it declares none."""
    declared = getattr(component, "Settings", None)
    if declared is not None:
        return declared
    if inspect.isfunction(component):
        return signature_settings(component)
    return None


def settings_fields(cls: type | None) -> list[tuple[str, str, Any]]:
    """(name, type, default) of each field of settings class `cls`; default `...` when required."""
    if cls is None:
        return []
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, Any)
        tp_name = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else ...)
        out.append((f.name, tp_name, default))
    return out


def check_keys(cls: type | None, table: Any, key: str, what: str = "") -> None:
    """Raise `SettingsError` unless `table` is a table whose keys are all fields of settings class `cls`."""
    if cls is None:
        return
    if not isinstance(table, dict):
        raise SettingsError(key, f"config key '{key}' must be a table, got {table!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(names))
    if unknown:
        takes = f"takes: {', '.join(names)}" if names else "takes no settings"
        raise SettingsError(f"{key}.{unknown[0]}", f"unknown config key '{key}.{unknown[0]}'; {what or key} {takes}")


def resolve(cls: type | None, table: dict, key: str, what: str = "") -> Any:
    """`table` (a config table) as an instance of settings class `cls`; the dict itself when `cls` is None.

    Raises:
        SettingsError: an unknown key, a wrong type, a missing required key or a value out of
            range, as one line naming the dotted key (`<key>.<field>`).
    """
    if cls is None:
        return dict(table)
    check_keys(cls, table, key, what)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in table]
    if missing:
        raise SettingsError(f"{key}.{missing[0]}", f"config key '{key}.{missing[0]}' is required by {what or key}")
    try:
        return from_dict(cls, table, key + ".")
    except SettingError as err:
        raise SettingsError(f"{key}.{err.name}", f"config key '{key}.{err.name}' {err.message}") from None
    except SettingsError:
        raise
    except ConfigError as err:
        raise SettingsError(key, str(err)) from None


def check_components(cfg: Config) -> None:
    """Look up every component `cfg` names and resolve its settings (see the module docstring)."""
    from mlml.methods.base import check_method_config

    check_method_config(cfg.method)
    resolve_sources(cfg.data)
    _check_observation(cfg)
    _check_backbone(cfg)


def _check_backbone(cfg: Config) -> None:
    from mlml.models.backbones import BACKBONES

    factory = lookup(BACKBONES, cfg.model.backbone, "model.backbone")
    resolve(getattr(factory, "Settings", None), cfg.model.backbone_args, "model.backbone_args",
            f"backbone '{cfg.model.backbone}'")


# ------------------------------------------------------------------ data sources: [data.<name>]
def source_settings_class(factory: Any) -> type | None:
    """The settings dataclass of a source factory: its `Settings` attribute, else the dataclass that
    annotates its second parameter (`fn(data, settings: S)`); None (its table as a dict) without either."""
    declared = getattr(factory, "Settings", None)
    if declared is not None:
        return declared
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return None
    if len(params) < 2 or params[1].annotation is inspect.Parameter.empty:
        return None
    try:
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception as err:      # a typo must not make the settings silently untyped
        raise TypeError(f"source factory {getattr(factory, '__qualname__', factory)}: the annotation of its settings "
                        f"parameter '{params[1].name}' does not evaluate ({err}); annotate it with a dataclass of module scope") from None
    tp = hints.get(params[1].name)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def source_members(settings: Any) -> list[str]:
    """The sources a source's settings name (a mixed source's members, the source recolour wraps)."""
    members = getattr(settings, "members", None)
    return list(members()) if callable(members) else []


def resolve_sources(data: DataConfig) -> None:
    """Resolve the settings of every source `data` uses (`data.source` and the members it names,
    transitively) in place, into `data.sources`; check the other `[data.<name>]` tables it gives too.

    A table of a source the run does not use may leave out required keys (a base config may hold
    the settings of sources chosen later): it is resolved when complete, else only its keys are checked.

    Raises:
        SettingsError: a table named after no source, an unknown key in a source's table, a wrong
            type or a value out of range, a required key missing from a used source's table; the
            message names the dotted key (`data.<source>.<key>`).
    """
    from mlml.data.pipeline import SOURCES

    todo = [(data.source, "data.source")]
    used: set[str] = set()
    while todo:
        name, key = todo.pop(0)
        if name not in used:
            _known_source(name, key, SOURCES)
            used.add(name)
            data.sources[name] = settings = _resolve_source(data, name)
            todo += [(member, f"data.{name}") for member in source_members(settings)]
    for name in [n for n in data.sources if n not in used]:
        _known_source(name, f"data.{name}", SOURCES)
        cls = source_settings_class(SOURCES.get(name))
        required = [f for f, _, default in settings_fields(cls) if default is ...]
        if all(f in data.sources[name] for f in required):
            data.sources[name] = _resolve_source(data, name)
        else:
            check_keys(cls, data.sources[name], f"data.{name}", f"source '{name}'")


def _known_source(name: str, key: str, sources: Any) -> None:
    if name in sources:
        return
    if key == f"data.{name}":
        raise SettingsError(key, f"unknown config key '{key}': not a key of [data] nor the table of a known source; "
                                 f"sources: {', '.join(sources.names())}")
    raise SettingsError(key, f"config key '{key}' = {name!r} is not a known source; known: {', '.join(sources.names())}")


def _resolve_source(data: DataConfig, name: str) -> Any:
    from mlml.data.pipeline import SOURCES

    table = data.sources.get(name, {})
    if dataclasses.is_dataclass(table) and not isinstance(table, type):
        table = dataclasses.asdict(table)           # resolved before (and maybe changed since): check it again
    return resolve(source_settings_class(SOURCES.get(name)), table, f"data.{name}", f"source '{name}'")


def source_settings(data: DataConfig, name: str) -> Any:
    """The settings of source `name` in `data` (`DataConfig.settings`): resolved when the config was
    loaded; resolved now (and kept in `data.sources`) for a config built in code."""
    from mlml.data.pipeline import SOURCES

    cls = source_settings_class(lookup(SOURCES, name, "data.source"))
    held = data.sources.get(name)
    if held is None or not (cls is None or isinstance(held, cls)):
        data.sources[name] = held = _resolve_source(data, name)
    return held


def upgrade_stored_config(raw: dict) -> dict:
    """A config stored by an mlml before source settings nested under `[data.<source>]` (flat
    `data.root`, `data.image_size`, ..., `config.toml` of a run, a checkpoint's config) in today's
    spelling; a config without old keys is returned unchanged. Each old key goes to the table of
    every source the run used that takes it; keys no used source read are dropped (they did not
    affect the run). A config file a person writes is not upgraded: its old keys are errors that
    name the new spelling (`mlml.config.moved_data_key`)."""
    from mlml.config import MOVED_DATA_KEYS, moved_data_key
    from mlml.data.pipeline import SOURCES

    data = dict(raw.get("data", {}))
    source = str(data.get("source", "synthetic"))
    old = {k: data.pop(k) for k in list(data) if moved_data_key(k, data[k], source)}
    if not old:
        return raw
    renamed = {"annotations": "file", "mixed": "sources", "mixed_eval": "eval", "mixed_train": "train", "mixed_unlabelled": "unlabelled"}
    used = [source] + (list(old.get("mixed", [])) if source == "mixed" else [])
    tables: dict[str, dict] = {}
    if "recolour" in used:                       # it wrapped the annotation source when one was given, else the folder
        tables["recolour"] = {"source": "annotations" if old.get("annotations") else "folder"}
        used.append(tables["recolour"]["source"])
    for name in used:
        if isinstance(data.get(name), dict):     # a table it had already (data.synthetic)
            continue
        cls = source_settings_class(SOURCES.get(name)) if name in SOURCES else None
        fields = {f.name for f in dataclasses.fields(cls)} if cls else set()
        for key, value in old.items():
            new = "image_sets" if (name, key) == ("voc", "annotations") else renamed.get(key, key)
            if new in fields and key in MOVED_DATA_KEYS:
                tables.setdefault(name, {})[new] = value
    return {**raw, "data": {**data, **tables}}


def _check_observation(cfg: Config) -> None:
    from mlml.data.observation import OBSERVATIONS
    from mlml.data.pipeline import SOURCES

    name = cfg.data.observation
    if name == "auto":
        name = getattr(lookup(SOURCES, cfg.data.source, "data.source"), "default_observation", None)
        if name is None:          # decided by the source object when it is built
            return
    cls = lookup(OBSERVATIONS, name, "data.observation")
    resolve(settings_class(cls), cfg.data.observation_args, "data.observation_args", f"observation model '{name}'")


def lookup(registry: Any, name: str, key: str) -> Any:
    """`registry.get(name)`, an unknown name being a `SettingsError` on `key`."""
    from mlml.registry import UnknownNameError

    try:
        return registry.get(name)
    except UnknownNameError as err:
        raise SettingsError(key, f"config key '{key}': {err}") from None
