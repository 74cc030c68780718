import json
import os
import subprocess
import sys

import pytest
import torch
from torchvision.utils import save_image

from mlml.cli import main
from tests.conftest import TINY


def sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *sets(*TINY), "--out", str(out)]) == 0
    return out


def test_eval_matches_the_run(trained, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(trained / "checkpoints" / "best.pt")]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((trained / "metrics.json").read_text())["metrics"]
    assert printed["test/mAP_macro"] == pytest.approx(saved["test/mAP_macro"], abs=1e-6)


def test_predict_prints_label_probabilities(trained, tmp_path, capsys):
    image = tmp_path / "x.png"
    save_image(torch.rand(3, 40, 40), image)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(trained / "checkpoints" / "best.pt"), str(image), "--json", "--top", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result[0]["top"]) == 3 and 0 <= result[0]["top"][0]["probability"] <= 1 and isinstance(result[0]["labels"], list)
    assert main(["predict", "--checkpoint", str(trained / "checkpoints" / "best.pt"), str(image)]) == 0
    assert "probability" not in capsys.readouterr().out


def test_config_error_names_the_key(capsys, tmp_path):
    assert main(["train", "--set", "optim.lrr=1", "--out", str(tmp_path / "r")]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_python_dash_m_works():
    done = subprocess.run([sys.executable, "-m", "mlml", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "reproduce" in done.stdout


@pytest.mark.parametrize("command", [["list"], ["list", "losses"]])
def test_output_cut_short_by_a_closed_pipe_stops_quietly(command):
    """`mlml list | head -1`: once the reader has gone, mlml stops with 141 (as if killed by SIGPIPE), no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)                       # the reader has already gone: every write to the pipe fails
    try:
        done = subprocess.run([sys.executable, "-m", "mlml", *command], stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert done.returncode == 141
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr and done.stderr == ""


GROUPED = ("method.name=grouped", "model.head=grouped", "data.synthetic.min_objects=1", "data.synthetic.max_objects=1",
           "data.synthetic.num_patterns=3", "data.observation=per_group")


def test_grouped_run_eval_and_predict(tmp_path, capsys):
    """A grouped run reports group metrics; eval reproduces them; predict shows a class or unknown per group."""
    out = tmp_path / "run"
    assert main(["train", *sets(*TINY, *GROUPED), "--out", str(out)]) == 0
    saved = json.loads((out / "metrics.json").read_text())["metrics"]
    for key in ("test/group_acc/colour", "test/group_acc/object", "test/group_acc/pattern",
                "test/unknown_acc/pattern", "test/unknown_auroc/pattern", "test/decoded_acc/pattern", "test/mAP_macro"):
        assert 0 <= saved[key] <= 1, key
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoints" / "best.pt")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["test/unknown_auroc/pattern"] == pytest.approx(saved["test/unknown_auroc/pattern"], abs=1e-6)
    image = tmp_path / "x.png"
    save_image(torch.rand(3, 40, 40), image)
    assert main(["predict", "--checkpoint", str(out / "checkpoints" / "best.pt"), str(image), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)[0]["groups"]
    assert set(groups) == {"colour", "object", "pattern"}
    assert groups["pattern"]["class"] in ("stripes", "dots", "checks", "unknown") and 0 <= groups["pattern"]["probability"] <= 1
    assert groups["colour"]["class"] != "unknown"            # no unknown class in the colour group
    assert main(["predict", "--checkpoint", str(out / "checkpoints" / "best.pt"), str(image)]) == 0
    assert "[pattern]" in capsys.readouterr().out


def test_list_prints_every_registry_with_settings_and_defaults(capsys):
    expected = {
        "methods": ["methods (method.name):", "  role  - ", "        k: float = 1.5", "        delta_rel: float = 0.2",
                    "  supervised  - ", "      method.args: none", "      method.teacher:", "        decay: float = 0.99",
                    "        threshold: float = 0.9", "      method.domain_branch:", "        hidden: int = 256"],
        "losses": ["losses (method.loss):", "  asl  - ", "        gamma_neg: float = 4.0", "        reduction: str = 'sum'",
                   "        k: float = 1.5"],
        "sources": ["sources (data.source):", "  synthetic", "  annotations"],
        "observations": ["  partial  - ", "        p: float = 0.1", "        labelled_fraction: float = 1.0"],
        "backbones": ["  small_cnn", "  resnet18"],
        "heads": ["  linear  - ", "  grouped  - "],
        "transforms": ["  strong", "  flip_crop"],
    }
    for what, lines in expected.items():
        assert main(["list", what]) == 0
        out = capsys.readouterr().out.splitlines()
        assert all(any(o.startswith(line) for o in out) for line in lines), (what, [l for l in lines if not any(o.startswith(l) for o in out)])
        others = [w for w in expected if w != what]
        assert not any(o.startswith(f"{w} (") for w in others for o in out)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{w} (" in "\n" + out for w in expected)
