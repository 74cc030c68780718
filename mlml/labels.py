"""The label space: names of the C labels and the groups they form.

Missing labels are never encoded in the label values: what training sees is a pair
`targets: float (B, C)` and `observed: bool (B, C)` (see `mlml.data.observation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Group:
    """A named set of labels.

    Attributes:
        name: group name, e.g. "colour".
        labels: indices of the group's labels in the label space.
        exclusive: at most one label of the group is positive per image.
        has_unknown: a grouped head adds an "unknown / none of these" class for this group.
        applies_to: labels (of other groups) whose presence makes this group apply to an image;
            empty means the group applies to every image.
    """

    name: str
    labels: tuple[int, ...]
    exclusive: bool = False
    has_unknown: bool = False
    applies_to: tuple[int, ...] = ()


@dataclass(frozen=True)
class LabelSpace:
    """Label names and their groups; every label belongs to exactly one group."""

    names: tuple[str, ...]
    groups: tuple[Group, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"label names are not unique: {self.names}")
        if not self.groups:  # a label space without groups has one non-exclusive group
            object.__setattr__(self, "groups", (Group("labels", tuple(range(len(self.names)))),))
        seen = sorted(i for g in self.groups for i in g.labels)
        if seen != list(range(len(self.names))):
            raise ValueError("every label must belong to exactly one group")

    @property
    def num_labels(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown label '{name}'; known: {', '.join(self.names)}") from None

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"unknown group '{name}'; known: {', '.join(g.name for g in self.groups)}")

    def group_mask(self, group: Group | str) -> torch.Tensor:
        """bool (C,): True on the labels of `group`."""
        g = self.group(group) if isinstance(group, str) else group
        mask = torch.zeros(self.num_labels, dtype=torch.bool)
        mask[list(g.labels)] = True
        return mask

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "groups": [
                {
                    "name": g.name,
                    "labels": list(g.labels),
                    "exclusive": g.exclusive,
                    "has_unknown": g.has_unknown,
                    "applies_to": list(g.applies_to),
                }
                for g in self.groups
            ],
        }

    def applies_to_names(self, group: Group) -> tuple[str, ...]:
        return tuple(self.names[i] for i in group.applies_to)

    @classmethod
    def from_dict(cls, d: dict) -> "LabelSpace":
        groups = tuple(
            Group(g["name"], tuple(g["labels"]), g["exclusive"], g["has_unknown"], tuple(g["applies_to"]))
            for g in d["groups"]
        )
        return cls(tuple(d["names"]), groups)


_GROUP_KEYS = ("labels", "exclusive", "has_unknown", "applies_to")


def configure_groups(space: LabelSpace, overrides: dict) -> LabelSpace:
    """The label space with its groups changed by configuration (`data.groups`).

    `overrides` maps a group name to a table of any of: `labels` (label names; they leave the groups
    that held them, and groups left empty are dropped), `exclusive`, `has_unknown` (bools) and
    `applies_to` (label names of other groups: the group applies to an image only if one of those
    labels is positive; [] = to every image). A name that is not a group of `space` defines a new
    group and must give `labels`. For example, in TOML:

        [data.groups.pattern]
        has_unknown = false
    """
    if not overrides:
        return space
    groups = {g.name: g for g in space.groups}
    for name, table in overrides.items():
        if not isinstance(table, dict) or set(table) - set(_GROUP_KEYS):
            raise ValueError(f"data.groups.{name} must be a table with keys among {', '.join(_GROUP_KEYS)}; got {table!r}")
        old = groups.get(name)
        if old is None and "labels" not in table:
            raise ValueError(f"data.groups.{name}: no such group (known: {', '.join(groups)}); a new group needs 'labels'")
        labels = tuple(space.index(n) for n in table["labels"]) if "labels" in table else old.labels
        for other in list(groups.values()):  # labels move: every label belongs to one group
            if other.name != name and set(other.labels) & set(labels):
                kept = tuple(i for i in other.labels if i not in labels)
                groups[other.name] = Group(other.name, kept, other.exclusive, other.has_unknown, other.applies_to)
        applies_to = tuple(space.index(n) for n in table["applies_to"]) if "applies_to" in table else (old.applies_to if old else ())
        if set(applies_to) & set(labels):
            raise ValueError(f"data.groups.{name}.applies_to names labels of the group itself")
        groups[name] = Group(
            name,
            labels,
            bool(table.get("exclusive", old.exclusive if old else False)),
            bool(table.get("has_unknown", old.has_unknown if old else False)),
            applies_to,
        )
    return LabelSpace(space.names, tuple(g for g in groups.values() if g.labels))
