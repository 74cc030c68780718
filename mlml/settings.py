"""Typed settings of components, resolved and checked when the config is loaded.

Every configurable component declares its settings beside itself as a dataclass named `Settings`
(a class attribute): a method (`method.args`), the teacher (`method.teacher`), the domain branch
(`method.domain_branch`), an observation model (`data.observation_args`), a backbone
(`model.backbone_args`, on its factory). A loss declares them as
its keyword parameters: `fn(logits, targets, observed, q: float = 0.05)` has the settings
`{q: float = 0.05}` (`signature_settings`), so there is no second list to keep in step.

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

from mlml.config import Config, ConfigError, from_dict


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


def resolve(cls: type | None, table: dict, key: str, what: str = "") -> Any:
    """`table` (a config table) as an instance of settings class `cls`; the dict itself when `cls` is None.

    Raises:
        SettingsError: an unknown key, a wrong type, a missing required key or a value out of
            range, as one line naming the dotted key (`<key>.<field>`).
    """
    if cls is None:
        return dict(table)
    if not isinstance(table, dict):
        raise SettingsError(key, f"config key '{key}' must be a table, got {table!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(names))
    if unknown:
        takes = f"takes: {', '.join(names)}" if names else "takes no settings"
        raise SettingsError(f"{key}.{unknown[0]}", f"unknown config key '{key}.{unknown[0]}'; {what or key} {takes}")
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
    _check_observation(cfg)
    _check_backbone(cfg)


def _check_backbone(cfg: Config) -> None:
    from mlml.models.backbones import BACKBONES

    factory = lookup(BACKBONES, cfg.model.backbone, "model.backbone")
    resolve(getattr(factory, "Settings", None), cfg.model.backbone_args, "model.backbone_args",
            f"backbone '{cfg.model.backbone}'")


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
