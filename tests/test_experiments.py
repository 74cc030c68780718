import pytest

from mlml.experiments import expand, read_table, reproduce
from tests.conftest import TINY


@pytest.fixture
def table(tmp_path):
    tiny = "\n".join(f'"{o}",' for o in TINY)
    (tmp_path / "tiny.toml").write_text(f"""
title = "tiny"
metrics = ["test/mAP_macro"]
[profiles.quick]
config = "base.toml"
seeds = 2
[settings]
sp = [{tiny} "data.observation=single_positive"]
[methods]
an = ["method.loss=an"]
full = ["method.loss=bce", "data.observation=full"]
""")
    (tmp_path / "base.toml").write_text("[optim]\nepochs = 1\n")
    return tmp_path / "tiny.toml"


def test_expand(table, tmp_path):
    runs = expand(read_table(str(table)), "quick", None, tmp_path / "runs")
    assert [(r.method, r.seed) for r in runs] == [("an", 0), ("an", 1), ("full", 0), ("full", 1)]


def test_reproduce_twice_skips_and_gives_the_same_table(table, tmp_path, capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    first = reproduce(str(table), "quick", runs_dir=runs, results_dir=results)
    assert "4 to run" in capsys.readouterr().err
    mtimes = {p: p.stat().st_mtime for p in runs.rglob("metrics.json")}
    second = reproduce(str(table), "quick", runs_dir=runs, results_dir=results)
    assert "0 to run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime for p in runs.rglob("metrics.json")} == mtimes
    assert first.split("Mean ±")[1] == second.split("Mean ±")[1]
    assert "| an |" in first and "| an | –" not in first and (results / "tiny.csv").exists()   # cells filled


def test_grouped_heads_table_builds_every_run(tmp_path):
    """Every run of the grouped-heads table, in both profiles, is a valid config whose model, data
    and method match (grouped methods with the grouped head, pattern data, one object per image)."""
    from mlml.config import load_config
    from mlml.data.synthetic import synthetic_label_space

    spec = read_table("grouped_heads")
    for profile in ("quick", "full"):
        runs = expand(spec, profile, 1, tmp_path)
        assert len(runs) == len(spec["settings"]) * len(spec["methods"])
        for run in runs:
            cfg = load_config(run.config, list(run.overrides))
            assert cfg.data.synthetic.max_objects == 1 and cfg.data.synthetic.num_patterns == 3
            assert (cfg.model.head == "grouped") == cfg.method.name.startswith("grouped"), run.method
            assert synthetic_label_space(cfg.data.synthetic).group("pattern").has_unknown
            assert cfg.data.groups == ({"pattern": {"has_unknown": False}} if run.method == "grouped_no_unknown" else {})
