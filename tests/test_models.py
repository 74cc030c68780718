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


def test_efficientnet_feature_map_pools_to_the_features_for_boostlu():
    from mlml.models.backbones import feature_map

    net = EfficientNetLite(TINY_STAGES, stem=8, head=16).eval()
    x = torch.randn(2, 3, 40, 40)
    fmap = feature_map(net, x)                                       # (2, 16, 10, 10): stride 4 in the tiny net
    assert fmap.shape == (2, 16, 10, 10) and torch.allclose(fmap.mean(dim=(2, 3)), net(x), atol=1e-6)


def test_backbone_args_are_typed_and_checked():
    cfg = load_config(None, ["model.backbone=efficientnet_lite0", "model.backbone_args={freeze_bn = true, drop_path = 0.1}"])
    assert build_model(cfg.model, SPACE).backbone.freeze_bn
    with pytest.raises(ConfigError, match=r"model\.backbone_args\.drop_path"):
        load_config(None, ["model.backbone=efficientnet_lite0", "model.backbone_args={drop_path = 1.5}"])
    with pytest.raises(ConfigError, match=r"model\.backbone_args\.frozen"):
        load_config(None, ["model.backbone=efficientnet_lite0", "model.backbone_args={frozen = true}"])
    with pytest.raises(ConfigError, match=r"model\.backbone_args\.freeze"):     # small_cnn takes none
        load_config(None, ["model.backbone_args={freeze = true}"])


# ---------------------------------------------------------------------------------------------
# BoostLU (model.boostlu)
# ---------------------------------------------------------------------------------------------


def test_boostlu_by_hand():
    from mlml.models.model import boostlu

    cam = torch.tensor([[-2.0, -0.5, 0.0, 0.5, 3.0]])
    assert boostlu(cam, 5.0).tolist() == [[-2.0, -0.5, 0.0, 2.5, 15.0]]


def test_boostlu_logits_are_the_mean_of_the_boosted_map():
    # one feature, one label, weight 1, bias 0, a 1 x 2 map [2, -1]: CAM [2, -1] -> [10, -1] -> 4.5,
    # where the pooled linear head gives 0.5
    from mlml.models.model import LinearHead

    head = LinearHead(1, LabelSpace(("a",)), ModelConfig())
    with torch.no_grad():
        head.fc.weight.fill_(1.0)
        head.fc.bias.zero_()
    fmap = torch.tensor([[[[2.0, -1.0]]]], requires_grad=True)        # (1, 1, 1, 2)
    logits = head.forward_map(fmap, 5.0)["logits"]
    assert logits.item() == pytest.approx(4.5)
    assert head(fmap.mean(dim=(2, 3)))["logits"].item() == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(logits.sum(), fmap)                  # boosted locations pull alpha times harder
    assert grad.flatten().tolist() == pytest.approx([2.5, 0.5])


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_boostlu_off_is_the_pooled_head(name):
    x = torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(0)
    plain = build_model(ModelConfig(backbone=name, width=8), SPACE).eval()
    torch.manual_seed(0)
    mapped = build_model(ModelConfig(backbone=name, width=8, boostlu=1.0 + 1e-7), SPACE).eval()
    torch.manual_seed(0)
    boosted = build_model(ModelConfig(backbone=name, width=8, boostlu=5.0), SPACE).eval()
    a, b, c = plain(x), mapped(x), boosted(x)
    assert torch.allclose(a["logits"], b["logits"], atol=1e-5) and torch.equal(a["features"], c["features"])
    assert (c["logits"] >= a["logits"] - 1e-5).all() and not torch.allclose(a["logits"], c["logits"])


def test_boostlu_needs_a_head_and_backbone_that_score_every_location():
    from mlml.config import ConfigError, load_config
    from mlml.models.backbones import feature_map

    with pytest.raises(ValueError, match="model.boostlu"):
        build_model(ModelConfig(width=8, head="grouped", boostlu=5.0), SPACE)
    with pytest.raises(ValueError, match="model.boostlu"):
        feature_map(torch.nn.Linear(3, 3), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ConfigError, match="model.boostlu"):
        load_config(None, ["model.boostlu=0"])
