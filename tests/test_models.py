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
