"""Typed settings: every registry's components are resolved and checked when the config is loaded,
each mistake a one-line ConfigError naming the dotted key and where it was set."""

from __future__ import annotations

import dataclasses
import re

import pytest

from mlml.config import ConfigError, load_config
from mlml.data.observation import OBSERVATIONS
from mlml.losses import LOSSES, an_ls, epr
from mlml.methods import METHODS, Method
from mlml.methods.domain import DomainBranchSettings
from mlml.methods.teacher import TeacherSettings
from mlml.settings import must, resolve, settings_class, settings_fields, signature_settings
from tests.conftest import tiny_config


def wrong_value(tp: str) -> object:
    """A TOML value of the wrong type for a field of type `tp`."""
    return "'text'" if "str" not in tp else "1.5"


# registry -> (config key of an entry's name, config key of its settings, the registry)
REGISTRIES = {
    "methods": ("method.name", "method.args", METHODS),
    "losses": ("method.loss", "method.loss_args", LOSSES),
    "observations": ("data.observation", "data.observation_args", OBSERVATIONS),
}


def entries():
    for registry, (_, _, reg) in REGISTRIES.items():
        for name in reg.names():
            yield pytest.param(registry, name, id=f"{registry}-{name}")


@pytest.mark.parametrize("registry, name", list(entries()))
def test_every_entry_refuses_an_unknown_key_and_a_wrong_type(registry, name):
    name_key, key, reg = REGISTRIES[registry]
    requires = getattr(reg.get(name), "requires", ())
    base = [f"{name_key}={name}", *requires]
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key '{key}.no_such_key'")):
        tiny_config(*base, f"{key}={{no_such_key = 1}}")
    cls = settings_class(reg.get(name))
    typed = [f for f in settings_fields(cls) if f[1] in ("float", "int", "str", "bool")]
    if typed:
        field, tp, _ = typed[0]
        with pytest.raises(ConfigError, match=re.escape(f"'{key}.{field}'")):
            tiny_config(*base, f"{key}={{{field} = {wrong_value(tp)}}}")
    # the defaults resolve
    tiny_config(*base)


@pytest.mark.parametrize("key, cls", [("method.teacher", TeacherSettings), ("method.domain_branch", DomainBranchSettings)])
def test_the_parts_refuse_an_unknown_key_a_wrong_type_and_a_bad_value(key, cls):
    assert "weight" in [name for name, _, _ in settings_fields(cls)]
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key '{key}.no_such_key'")):
        tiny_config(f"{key}={{no_such_key = 1}}")
    with pytest.raises(ConfigError, match=re.escape(f"'{key}.weight' must be float")):
        tiny_config(f"{key}={{weight = 'high'}}")
    with pytest.raises(ConfigError, match=re.escape(f"'{key}.weight' must be >= 0, got -1.0")):
        tiny_config(f"{key}={{weight = -1.0}}")


def test_bad_values_and_names_are_one_line_errors_naming_the_key_and_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[method]\nname = "role"\nargs = {k = -1.0}\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: config key 'method.args.k' must be > 0, got -1.0"
    with pytest.raises(ConfigError, match=re.escape("--set method.args={k = -2.0}: config key 'method.args.k' must be > 0, got -2.0")):
        load_config(path, ["method.args={k = -2.0}"])
    for override, key in (("method.name=nope", "method.name"), ("method.loss=nope", "method.loss"),
                          ("data.observation=nope", "data.observation"), ("model.head=nope", "model.head"),
                          ("model.backbone=nope", "model.backbone"), ("data.source=nope", "data.source"),
                          ("method.pos_weight=some", "method.pos_weight")):
        with pytest.raises(ConfigError, match=re.escape(f"config key '{key}'")) as err:
            load_config(None, [override])
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="'data.observation_args.p' must be in"):
        load_config(None, ["data.observation=partial", "data.observation_args={p = 0.0}"])
    with pytest.raises(ConfigError, match="defines its own loss"):
        load_config(None, ["method.name=role", "method.loss_args={k = 2.0}"])
    load_config(None, ["method.name=role", "method.loss=epr", "method.loss_args={k = 2.0}", "method.teacher={weight = 1.0}"])


def test_loss_settings_are_derived_from_the_signature():
    fields = {f.name: f.default for f in dataclasses.fields(signature_settings(epr))}
    assert fields == {"k": 1.5}
    assert resolve(settings_class(an_ls), {"eps": 0}, "method.loss_args").eps == 0.0      # int accepted for float

    def free(logits, targets, observed, **anything):
        return logits.sum()

    def required(logits, targets, observed, q: float):
        return logits.sum()

    assert settings_class(free) is None and resolve(None, {"x": 1}, "method.loss_args") == {"x": 1}
    with pytest.raises(ConfigError, match=re.escape("config key 'method.loss_args.q' is required")):
        resolve(settings_class(required), {}, "method.loss_args")


def test_a_plugin_method_without_settings_gets_its_dict(tmp_path):
    from mlml.distributed import DistInfo
    from mlml.trainer import Trainer

    class Untyped(Method):
        def objective(self, outputs, batch):
            return {"loss": outputs["image"]["logits"].float().pow(2).mean() * self.args["scale"]}

    METHODS.register("untyped_test_method")(Untyped)
    try:
        trainer = Trainer(tiny_config("method.name=untyped_test_method", "method.args={scale = 2.0, anything = 'goes'}"),
                          tmp_path, DistInfo())
        assert trainer.method.args == {"scale": 2.0, "anything": "goes"}
        assert trainer.train_step(next(iter(trainer.train_loader)))["loss"] > 0
    finally:
        METHODS._entries.pop("untyped_test_method")


def test_overriding_a_template_method_is_an_error():
    with pytest.raises(TypeError, match=r"defines training_step\(\).*objective\(outputs, batch\)"):
        class Old(Method):
            def training_step(self, batch, model):
                return {}
    with pytest.raises(TypeError, match=r"defines end_step\(\).*on_step_end"):
        class Older(Method):
            def end_step(self, model, step):
                pass


# ------------------------------------------------------------------ data sources: [data.<name>]
@dataclasses.dataclass
class TilesSettings:
    """The settings of a plug-in source registered by a test."""

    side: int = 16
    colours: int = 3

    def __post_init__(self) -> None:
        must(self.side >= 8, "side", ">= 8", self.side)


def source_entries():
    from mlml.data.pipeline import SOURCES

    return [pytest.param(name, id=f"sources-{name}") for name in SOURCES.names()]


def required_values(cls) -> list[str]:
    """`<field>='x'` for each required field of a source's settings (a path the loader checks later)."""
    return [f"{name}='x'" for name, _, default in settings_fields(cls) if default is ...]


@pytest.mark.parametrize("name", source_entries())
def test_every_source_refuses_an_unknown_key_a_wrong_type_and_a_bad_value_in_its_table(name, tmp_path):
    from mlml.data.pipeline import SOURCES
    from mlml.settings import source_settings_class

    cls = source_settings_class(SOURCES.get(name))
    assert cls is not None, f"source '{name}' declares no settings dataclass"
    path = tmp_path / "c.toml"
    path.write_text(f'[data]\nsource = "{name}"\n\n[data.{name}]\nno_such_key = 1\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: unknown config key 'data.{name}.no_such_key'; source '{name}' takes: ")
    members = [f"data.{name}.sources=['synthetic', 'synthetic']"] if name == "mixed" else []
    base = [f"data.source={name}", *members, *(f"data.{name}.{v}" for v in required_values(cls))]
    typed = [f for f in settings_fields(cls) if f[1] in ("float", "int", "str", "bool") and f[2] is not ...]
    field, tp, _ = typed[0]
    with pytest.raises(ConfigError, match=re.escape(f"--set data.{name}.{field}=") + ".*" + re.escape(f"'data.{name}.{field}'")):
        load_config(None, [*base, f"data.{name}.{field}={wrong_value(tp)}"])
    if "image_size" in [f[0] for f in typed]:
        with pytest.raises(ConfigError, match=re.escape(f"config key 'data.{name}.image_size' must be in [8, ") + r"\d+\], got 4"):
            load_config(None, [*base, f"data.{name}.image_size=4"])


@pytest.mark.parametrize("old, value, new", [
    ("image_size", "16", "data.annotations.image_size"), ("root", "'/d'", "data.annotations.root"),
    ("annotations", "'a.csv'", "data.annotations.file"), ("annotations", "{train = 'a.csv'}", "data.annotations.file"),
    ("label_names", "'l.txt'", "data.annotations.label_names"), ("allow_outside_root", "true", "data.annotations.allow_outside_root"),
    ("confidence_threshold", "0.5", "data.tencent.confidence_threshold"), ("colours", "4", "data.recolour.colours"),
    ("mixed", "['synthetic', 'annotations']", "data.mixed.sources"), ("mixed_eval", "0", "data.mixed.eval"),
    ("mixed_train", "[1, 2]", "data.mixed.train"), ("mixed_unlabelled", "[1]", "data.mixed.unlabelled"),
])
def test_an_old_flat_data_key_names_its_new_spelling(old, value, new, tmp_path):
    path = tmp_path / "old.toml"
    path.write_text(f"[data]\n{old} = {value}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: config key 'data.{old}' has moved into the table of the source that reads it: "
                              f"write '{new}' (see mlml list sources)")


def test_the_new_spelling_names_the_configured_source():
    with pytest.raises(ConfigError, match=re.escape("write 'data.folder.image_size'")):
        load_config(None, ["data.source=folder", "data.image_size=16"])
    with pytest.raises(ConfigError, match=re.escape("write 'data.voc.image_sets'")):
        load_config(None, ["data.source=voc", "data.annotations={train = 'trainval'}"])


def test_a_table_of_no_source_and_a_source_naming_an_unknown_member_are_errors():
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'data.synthetc': not a key of [data] nor the table of a known source")):
        load_config(None, ["data.synthetc.image_size=16"])
    with pytest.raises(ConfigError, match=re.escape("config key 'data.mixed' = 'nope' is not a known source")):
        load_config(None, ["data.source=mixed", "data.mixed.sources=['synthetic', 'nope']"])
    with pytest.raises(ConfigError, match=re.escape("config key 'data.recolour.source' must be a source other than recolour and mixed")):
        load_config(None, ["data.source=recolour", "data.recolour.source=mixed"])
    # A table of a source the run does not use may leave out required keys (chosen later), not misspell one.
    assert load_config(None, ["data.annotations.image_size=16"]).to_dict()["data"]["annotations"] == {"image_size": 16}
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'data.annotations.imagesize'")):
        load_config(None, ["data.annotations.imagesize=16"])
    with pytest.raises(ConfigError, match=re.escape("--set data.source=annotations: config key 'data.annotations.file' is required")):
        load_config(None, ["data.annotations.image_size=16", "data.source=annotations"])


def test_a_plugin_source_reads_its_own_table(tmp_path):
    """A source registered by a plug-in declares its settings as the dataclass of its factory's
    `settings` parameter: its table `[data.<name>]` is resolved and checked at load, and the
    factory receives it; a factory without one gets its table as a dict."""
    from mlml.data.pipeline import SOURCES, build_data
    from mlml.data.synthetic import SyntheticConfig, SyntheticSource

    seen = []

    def tiles(data, settings: TilesSettings):
        seen.append(settings)
        return SyntheticSource(SyntheticConfig(image_size=settings.side, num_colours=settings.colours),
                               data.n_train + data.n_val + data.n_test, data.data_seed)

    def untyped(data, settings):
        seen.append(settings)
        return SyntheticSource(SyntheticConfig(image_size=settings["side"]), data.n_train + data.n_val + data.n_test, data.data_seed)

    SOURCES.register("test_tiles")(tiles)
    SOURCES.register("test_untyped")(untyped)
    try:
        path = tmp_path / "tiles.toml"
        path.write_text('[data]\nsource = "test_tiles"\nn_train = 16\nn_val = 8\nn_test = 8\n\n[data.test_tiles]\nside = 8\n')
        cfg = load_config(path, ["data.test_tiles.colours=4"])
        assert cfg.data.settings() == TilesSettings(side=8, colours=4)
        assert cfg.to_dict()["data"]["test_tiles"] == {"side": 8, "colours": 4} and "synthetic" not in cfg.to_dict()["data"]
        data = build_data(cfg.data)
        assert seen[-1] == TilesSettings(side=8, colours=4) and data.image_size == 8
        assert data.label_space.group("colour").labels == (0, 1, 2, 3)
        path.write_text('[data]\nsource = "test_tiles"\n\n[data.test_tiles]\nside = 4\n')
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert str(err.value) == f"{path}: config key 'data.test_tiles.side' must be >= 8, got 4"
        with pytest.raises(ConfigError, match=re.escape("--set data.test_tiles.sides=8: unknown config key 'data.test_tiles.sides'; "
                                                        "source 'test_tiles' takes: side, colours")):
            load_config(None, ["data.source=test_tiles", "data.test_tiles.sides=8"])
        cfg = load_config(None, ["data.source=test_untyped", "data.test_untyped={side = 8, anything = 'goes'}",
                                 "data.n_train=16", "data.n_val=8", "data.n_test=8"])
        assert build_data(cfg.data).image_size == 8 and seen[-1] == {"side": 8, "anything": "goes"}
    finally:
        SOURCES._entries.pop("test_tiles")
        SOURCES._entries.pop("test_untyped")


def test_a_stored_config_of_an_older_mlml_is_upgraded_to_the_same_config(tmp_path):
    """config.toml / checkpoint configs written before [data.<source>] read back as the config they were."""
    from mlml.config import Config, config_hash, from_dict, validate_config
    from mlml.settings import upgrade_stored_config

    old = {"data": {"source": "annotations", "annotations": "/a.jsonl", "label_names": "/l.json", "root": "", "image_size": 16,
                    "allow_outside_root": False, "colours": 6, "mixed": [], "mixed_eval": -1, "confidence_threshold": 0.5,
                    "store": "/s", "synthetic": {"image_size": 32}}}
    new = load_config(None, ["data.source=annotations", "data.annotations.file=/a.jsonl", "data.annotations.label_names=/l.json",
                             "data.annotations.image_size=16", "data.store=/s", "data.synthetic.image_size=32"])
    assert config_hash(validate_config(from_dict(Config, upgrade_stored_config(old)))) == config_hash(new)
    assert upgrade_stored_config(new.to_dict()) == new.to_dict()          # today's spelling is left alone
    path = tmp_path / "config.toml"
    path.write_text('[data]\nsource = "recolour"\nroot = "/r"\nimage_size = 16\ncolours = 4\nannotations = ""\n')
    cfg = load_config(path, stored=True)
    assert cfg.data.settings().source == "folder" and cfg.data.settings().colours == 4
    assert cfg.data.settings("folder").root == "/r" and cfg.data.settings("folder").image_size == 16
    with pytest.raises(ConfigError, match="has moved"):
        load_config(path)
