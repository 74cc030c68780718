"""External plug-ins: the example package in tests/plugin_pkg runs through `mlml train` and
`mlml reproduce` in subprocesses, found only through its entry-point metadata; a broken plug-in
fails with an error naming it."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mlml.registry import PluginError, Registry
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = Path(__file__).resolve().parent / "plugin_pkg"


def dist_info(directory: Path, name: str, groups: dict[str, dict[str, str]]) -> Path:
    """A minimal installed-distribution record (what pip writes) holding `groups` as entry points."""
    info = directory / f"{name}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in groups.items())
    )
    return directory


def mlml(args: list[str], *paths: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (*paths, ROOT))}
    return subprocess.run([sys.executable, "-m", "mlml", *args], capture_output=True, text=True, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """The example package's entry points, read from its pyproject.toml, as installed metadata."""
    with open(PLUGIN / "pyproject.toml", "rb") as f:
        groups = tomllib.load(f)["project"]["entry-points"]
    return dist_info(tmp_path_factory.mktemp("site"), "mlml_plugin_example", groups)


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


PLUGGED = ["data.source=quadrants", "data.quadrants.image_size=16", "method.name=consistency", "method.loss=soft_an",
           "method.loss_args={q = 0.1}", "method.args={weight = 2.0}"]


def test_mlml_train_runs_the_plugin_method_loss_and_source(plugin_path, tmp_path):
    done = mlml(["train", *sets(*TINY, *PLUGGED, "run.threads=1"), "--out", str(tmp_path / "run")], plugin_path, PLUGIN, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result["method"] == "consistency-soft_an"
    assert set(result["per_class_ap"]["student"]) == {"red", "green", "blue", "yellow", "white"}
    assert result["metrics"]["test/mAP_macro"] > 0.5


def test_mlml_reproduce_runs_a_table_with_the_plugin_method(plugin_path, tmp_path):
    tiny = ", ".join(f'"{o}"' for o in (*TINY, "data.source=quadrants", "data.quadrants.image_size=16"))
    (tmp_path / "base.toml").write_text("[run]\nthreads = 1\n")
    (tmp_path / "plugged.toml").write_text(f"""
title = "built-in and plug-in methods on the plug-in source"
metrics = ["test/mAP_macro"]
[profiles.quick]
config = "base.toml"
seeds = 1
[settings]
single_positive = [{tiny}]
[methods]
an = ["method.loss=an"]
consistency = ["method.name=consistency", "method.loss=soft_an"]
""")
    args = ["reproduce", str(tmp_path / "plugged.toml"), "--runs-dir", "runs", "--results-dir", "results"]
    done = mlml(args, plugin_path, PLUGIN, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 to run" in done.stderr
    table = (tmp_path / "results" / "plugged.md").read_text()
    assert "| an |" in table and "| consistency |" in table and "–" not in table
    assert (tmp_path / "runs" / "plugged" / "single_positive" / "consistency" / "seed0" / "metrics.json").exists()


def test_plugin_settings_are_checked_when_the_config_is_loaded(plugin_path, tmp_path):
    """A plug-in method's `Settings`, a plug-in loss's keyword parameters and a plug-in source's
    table are validated like the built-ins': a one-line error naming the key, before any data are built."""
    for override, message in (("method.args={weight = 'heavy'}", "config key 'method.args.weight' must be float"),
                              ("method.args={weight = -1.0}", "config key 'method.args.weight' must be >= 0, got -1.0"),
                              ("method.loss_args={r = 0.1}", "unknown config key 'method.loss_args.r'; loss 'soft_an' takes: q")):
        done = mlml(["train", *sets(*TINY, *PLUGGED, override), "--out", str(tmp_path / "run")], plugin_path, PLUGIN, cwd=tmp_path)
        assert done.returncode == 2 and message in done.stderr and "error: --set method." in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    # A plug-in source's own table, [data.quadrants], typed by its factory's settings dataclass.
    for override, message in (("data.quadrants.image_size=15", "config key 'data.quadrants.image_size' must be an even number >= 8, got 15"),
                              ("data.quadrants.size=16", "unknown config key 'data.quadrants.size'; source 'quadrants' takes: image_size, grey")):
        done = mlml(["train", *sets(*TINY, *PLUGGED, override), "--out", str(tmp_path / "run")], plugin_path, PLUGIN, cwd=tmp_path)
        assert done.returncode == 2 and f"error: --set {override}: {message}" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = mlml(["list"], plugin_path, PLUGIN, cwd=tmp_path)
    assert done.returncode == 0 and "consistency" in done.stdout and "ramp_epochs: float = 1.0" in done.stdout
    assert "  quadrants  - Images of four coloured quadrants" in done.stdout
    assert "      data.quadrants:\n        image_size: int = 32\n        grey: float = 0.4\n" in done.stdout


def test_a_broken_plugin_fails_with_an_error_naming_it(tmp_path, monkeypatch):
    site = dist_info(tmp_path, "broken_plugin", {"mlml.methods": {"shiny": "mlml_no_such_module:Shiny"}})
    monkeypatch.syspath_prepend(str(site))
    registry = Registry("method", entry_point_group="mlml.methods")
    with pytest.raises(PluginError, match=r"plug-in 'shiny' \(mlml_no_such_module:Shiny\) in entry-point group 'mlml.methods'"):
        registry.get("supervised")
    done = mlml(["train", *sets(*TINY), "--out", str(tmp_path / "run")], site, cwd=tmp_path)
    assert done.returncode == 2
    assert "plug-in 'shiny' (mlml_no_such_module:Shiny)" in done.stderr and "Traceback" not in done.stderr


def test_a_plugin_name_taken_by_another_entry_is_an_error(tmp_path, monkeypatch):
    from mlml import losses

    site = dist_info(tmp_path, "clashing_plugin", {"mlml.losses": {"an": "mlml.losses:bce", "bce": "mlml.losses:bce"}})
    monkeypatch.syspath_prepend(str(site))
    registry = Registry("loss", entry_point_group="mlml.losses")
    registry.register("bce")(losses.bce)          # the same object under its own name is fine
    registry.register("an")(losses.an)
    with pytest.raises(PluginError, match=r"plug-in 'an' \(mlml.losses:bce\) .* clashes with the loss 'an' already registered \(mlml.losses.an\)"):
        registry.get("an")
