"""Name -> factory registries, filled by decorators and by entry points of external packages.

A registry is a plain dict with a decorator in front and a helpful error behind: looking up an
unknown name raises a `KeyError` that lists the known ones. Entries of installed plug-in packages
are loaded lazily, on the first lookup, from the entry-point group the registry names
(`mlml.methods`, `mlml.losses`, `mlml.sources`, ...). A plug-in that fails to import, or whose
name is already taken, raises an error naming the plug-in and its entry point, never a silent skip.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A registry lookup of a name nobody registered."""

    def __str__(self) -> str:
        return str(self.args[0])


class PluginError(RuntimeError):
    """An external plug-in could not be loaded."""


class Registry(Generic[T]):
    """A mapping from names to factories (classes or functions).

    Args:
        kind: what the entries are, for error messages ("loss", "method", ...).
        entry_point_group: the `importlib.metadata` entry-point group external packages use.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}
        self._plugins_loaded = entry_point_group is None

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator that registers its target under `name` (default: its `__name__`)."""

        def decorator(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._entries and self._entries[key] is not obj:
                raise ValueError(f"{self.kind} '{key}' is already registered")
            self._entries[key] = obj
            return obj

        return decorator

    def get(self, name_or_obj: str | T) -> T:
        """The entry registered as `name_or_obj`; a non-string is returned unchanged."""
        if not isinstance(name_or_obj, str):
            return name_or_obj
        self._load_plugins()
        try:
            return self._entries[name_or_obj]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} '{name_or_obj}'; known: {known}") from None

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            try:
                obj: Any = ep.load()
            except Exception as err:  # a broken plug-in must say which one it is
                raise PluginError(
                    f"plug-in '{ep.name}' ({ep.value}) in entry-point group "
                    f"'{self.entry_point_group}' failed to load: {err!r}"
                ) from err
            # A module entry point registers itself on import; a callable is registered by name,
            # unless that name is taken by something else (two plug-ins, or a plug-in and a built-in).
            if not callable(obj):
                continue
            known = self._entries.setdefault(ep.name, obj)
            if known is not obj:
                raise PluginError(
                    f"plug-in '{ep.name}' ({ep.value}) in entry-point group '{self.entry_point_group}' "
                    f"clashes with the {self.kind} '{ep.name}' already registered "
                    f"({getattr(known, '__module__', '?')}.{getattr(known, '__qualname__', known)}); rename one of them"
                )
