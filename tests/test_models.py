import pytest
import torch

from mlml.config import ModelConfig
from mlml.labels import LabelSpace
from mlml.models import BACKBONES, build_model

SPACE = LabelSpace(tuple("abcde"))


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_forward_contract(name):
    model = build_model(ModelConfig(backbone=name, width=8), SPACE)
    out = model(torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8))
    assert out["logits"].shape == (2, 5) and out["features"].shape[0] == 2


def test_every_backbone_is_registered():
    assert {"small_cnn", "resnet18", "resnet50"} <= set(BACKBONES.names())


def test_weights_from_local_file(tmp_path):
    src = build_model(ModelConfig(width=8), SPACE)
    path = tmp_path / "w.pt"
    torch.save(src.backbone.state_dict(), path)
    dst = build_model(ModelConfig(width=8, weights=str(path)), SPACE)
    for a, b in zip(src.backbone.state_dict().values(), dst.backbone.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="model.weights"):
        build_model(ModelConfig(width=8, weights=str(tmp_path / "missing.pt")), SPACE)


# ------------------------------------------------------------------ EfficientNet-Lite0
from mlml.config import ConfigError, load_config  # noqa: E402
from mlml.models.efficientnet import EfficientNetLite, SameConv2d  # noqa: E402


@pytest.mark.parametrize("size", [16, 33])
def test_efficientnet_lite0_forward_contract_any_size(size):
    model = build_model(ModelConfig(backbone="efficientnet_lite0"), SPACE)
    out = model(torch.randint(0, 255, (2, 3, size, size), dtype=torch.uint8))
    assert out["logits"].shape == (2, 5) and out["features"].shape == (2, 1280)
    assert sum(p.numel() for p in model.backbone.parameters()) == 3_371_008   # Lite0 without its classifier


@pytest.mark.parametrize("size", [7, 8, 9, 16])
@pytest.mark.parametrize("kernel", [3, 5])
def test_same_conv_pads_like_tensorflow(size, kernel):
    """TensorFlow "SAME": output ceil(i / s); the odd padding pixel goes bottom/right."""
    conv = SameConv2d(1, 1, kernel, stride=2)
    x = torch.randn(1, 1, size, size)
    total = max((-(-size // 2) - 1) * 2 + kernel - size, 0)
    before, after = total // 2, total - total // 2
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, [before, after, before, after]), conv.weight, stride=2)
    assert torch.allclose(conv(x), expected) and conv(x).shape[-1] == -(-size // 2)


TINY_STAGES = ((1, 3, 1, 1, 8), (1, 3, 2, 2, 8))


def test_efficientnet_freeze_bn_keeps_statistics_and_freeze_keeps_everything():
    x = torch.randn(4, 3, 16, 16)
    net = EfficientNetLite(TINY_STAGES, stem=8, head=16, freeze_bn=True).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net(x).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items() if "running" in k)
    assert net.stem.conv.weight.grad is not None and net.stem.bn.weight.grad is None
    probe = EfficientNetLite(TINY_STAGES, stem=8, head=16, freeze=True).train()
    assert not any(p.requires_grad for p in probe.parameters()) and not probe.training
    trained = EfficientNetLite(TINY_STAGES, stem=8, head=16).train()
    trained(x)
    assert not torch.equal(trained.stem.bn.running_mean, torch.zeros(8))     # the check above can fail


def test_backbone_args_are_typed_and_checked():
    cfg = load_config(None, ["model.backbone=efficientnet_lite0", "model.backbone_args={freeze_bn = true, drop_path = 0.1}"])
    assert build_model(cfg.model, SPACE).backbone.freeze_bn
    with pytest.raises(ConfigError, match=r"model\.backbone_args\.drop_path"):
        load_config(None, ["model.backbone=efficientnet_lite0", "model.backbone_args={drop_path = 1.5}"])
    with pytest.raises(ConfigError, match=r"model\.backbone_args\.frozen"):
        load_config(None, ["model.backbone=efficientnet_lite0", "model.backbone_args={frozen = true}"])
    with pytest.raises(ConfigError, match=r"model\.backbone_args\.freeze"):     # small_cnn takes none
        load_config(None, ["model.backbone_args={freeze = true}"])
