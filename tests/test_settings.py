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
from mlml.settings import resolve, settings_class, settings_fields, signature_settings
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
