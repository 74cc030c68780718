import pytest
import torch

from mlml.config import ConfigError
from mlml.evaluation import check_selection, group_metrics, split_metric_names, split_metrics, validation_metric_names
from mlml.labels import Group, LabelSpace
from mlml.trainer import Trainer, train
from tests.conftest import tiny_config


def test_split_metric_names_are_the_keys_split_metrics_reports():
    g = torch.Generator().manual_seed(0)
    scores, targets = torch.rand(20, 4, generator=g), (torch.rand(20, 4, generator=g) > 0.5).float()
    assert split_metric_names() == sorted(split_metrics(scores, targets, 0.5, None))


def test_validation_metric_names_follow_models_groups_and_label_kind():
    space = LabelSpace(("red", "blue", "cat"), (Group("colour", (0, 1), exclusive=True), Group("things", (2,))))
    names = validation_metric_names(["teacher", "student"], space, full_labels=True)
    assert {"val/mAP_macro", "val_student/f1_micro", "val/group_acc/colour", "val/unknown_auroc/colour"} <= set(names)
    assert not any("things" in n or n.startswith("val_teacher/") for n in names)
    assert not any("group_acc" in n for n in validation_metric_names(["student"], space, full_labels=False))
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    reported = group_metrics(torch.tensor([[0.8, 0.1, 0.7], [0.3, 0.2, 0.1]]), targets, space, {})
    assert {f"val/{k}" for k in reported} <= set(names)
    with pytest.raises(ConfigError, match="'eval.select' = 'val/group_acc/shape'"):
        check_selection("val/group_acc/shape", True, ["student"], space)


def test_a_selection_metric_of_an_unknown_group_or_model_stops_before_training(tmp_path, monkeypatch):
    def no_training(self, batch):
        raise AssertionError("trained before the selection metric was checked")

    monkeypatch.setattr(Trainer, "train_step", no_training)
    for select in ("val/group_acc/nosuch", "val_teacher/mAP_macro"):
        with pytest.raises(ConfigError, match="eval.select"):
            train(tiny_config(f"eval.select={select}"), tmp_path / select.replace("/", "_"))
