"""The label space and its configurable groups (`data.groups`)."""

from __future__ import annotations

import pytest

from mlml.config import load_config, to_toml
from mlml.labels import Group, LabelSpace, configure_groups

SPACE = LabelSpace(
    ("red", "blue", "circle", "bar", "stripes", "dots"),
    (Group("colour", (0, 1), True), Group("object", (2, 3), True), Group("pattern", (4, 5), True, True, (2,))),
)


def test_no_overrides_is_the_same_space():
    assert configure_groups(SPACE, {}) is SPACE


def test_override_flags_and_applicability():
    space = configure_groups(SPACE, {"pattern": {"has_unknown": False, "applies_to": ["circle", "bar"]}, "colour": {"exclusive": False}})
    assert space.group("pattern") == Group("pattern", (4, 5), True, False, (2, 3))
    assert not space.group("colour").exclusive and space.group("object") == SPACE.group("object")


def test_new_group_takes_its_labels_from_the_others():
    space = configure_groups(SPACE, {"texture": {"labels": ["stripes", "dots", "bar"], "exclusive": True}})
    assert [g.name for g in space.groups] == ["colour", "object", "texture"]   # "pattern" left empty: dropped
    assert space.group("object").labels == (2,) and space.group("texture").labels == (4, 5, 3)


@pytest.mark.parametrize(
    "overrides, match",
    [({"nosuch": {"exclusive": True}}, "new group needs 'labels'"), ({"pattern": {"exclusiv": True}}, "keys among"),
     ({"pattern": {"applies_to": ["stripes"]}}, "group itself"), ({"pattern": {"applies_to": ["square"]}}, "unknown label")],
)
def test_bad_overrides_raise(overrides, match):
    with pytest.raises((ValueError, KeyError), match=match):
        configure_groups(SPACE, overrides)


def test_groups_in_config_roundtrip_and_reach_the_data(tmp_path):
    from mlml.data.pipeline import build_data

    cfg = load_config(None, ["data.n_train=8", "data.n_val=4", "data.n_test=4", "data.synthetic.image_size=8",
                             "data.synthetic.max_objects=1", "data.synthetic.num_patterns=2",
                             "data.groups={pattern = {has_unknown = false}}"])
    (tmp_path / "c.toml").write_text(to_toml(cfg.to_dict()))
    assert load_config(tmp_path / "c.toml") == cfg
    data = build_data(cfg.data)
    assert not data.label_space.group("pattern").has_unknown
    assert data.observation.label_space is data.label_space
