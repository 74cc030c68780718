import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from mlml.tensorboard import VAL_METRICS, pr_curve_labels, table_layout, write_table_layout
from mlml.trainer import train
from tests.conftest import tiny_config


def events(directory) -> EventAccumulator:
    acc = EventAccumulator(str(directory), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "run"
    cfg = tiny_config("run.setting=sp", "run.method_label=an_tiny", "run.experiment=tiny")
    return out, train(cfg, out), cfg


def test_tags_are_the_same_for_every_method(run):
    out, _, _ = run
    tags = events(out).Tags()
    assert {"train/loss", "train/lr", *(f"val/{m}" for m in VAL_METRICS), "test/mAP_macro"} <= set(tags["scalars"])
    assert tags["images"] == ["test/images"]


def test_pr_curves_of_the_most_and_least_frequent_labels(run):
    out, _, cfg = run
    from mlml.data.pipeline import build_data

    data = build_data(cfg.data)
    targets = data.labels.dense(data.splits["test"]).float()
    wanted = {f"test_pr/{data.label_space.names[c]}" for c in pr_curve_labels(targets)}
    assert len(wanted) == 6
    assert {t for t in events(out).Tags()["tensors"] if t.startswith("test_pr/")} == wanted


def test_hparams_record_names_method_and_setting(run):
    out, result, _ = run
    acc = events(out)
    content = acc.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["method"].string_value == "an_tiny" and start.hparams["setting"].string_value == "sp"
    assert start.hparams["seed"].number_value == 0
    assert "_hparams_/experiment" not in acc.summary_metadata      # TensorBoard builds it from all runs
    assert acc.Scalars("test/mAP_macro")[0].value == pytest.approx(result["metrics"]["test/mAP_macro"])


def test_pr_curve_labels_skips_labels_without_positives():
    targets = torch.tensor([[1, 0, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 0, 0, 0]]).float()   # counts 3 1 1 0 2
    assert pr_curve_labels(targets, frequent=2, rare=2) == [0, 4, 2, 1]


def test_table_layout_is_one_chart_per_metric(tmp_path):
    layout = table_layout("tiny", ["test/f1_micro", "test/mAP_macro"])
    charts = layout["tiny: validation per epoch (every method)"]
    assert list(charts)[:2] == ["val/f1_micro", "val/mAP_macro"] and len(charts) == len(VAL_METRICS)
    write_table_layout(tmp_path, "tiny", ["test/mAP_macro"])
    write_table_layout(tmp_path, "tiny", ["test/mAP_macro"])      # replaces, does not add, a layout
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    acc = events(tmp_path)
    (tensor,) = acc.Tensors("custom_scalars__config__")
    stored = layout_pb2.Layout.FromString(tensor.tensor_proto.string_val[0])
    titles = [chart.title for category in stored.category for chart in category.chart]
    assert "val/mAP_macro" in titles and "train/loss" in titles
    regex = next(c for cat in stored.category for c in cat.chart if c.title == "val/mAP_macro").multiline.tag[0]
    assert re.match(regex, "val/mAP_macro") and re.match(regex, "val_student/mAP_macro") and not re.match(regex, "val/mAP_micro")
