"""TensorBoard logging of a run, and the custom-scalars layout of a table.

A run logs scalars, an HPARAMS record (method, setting, seed and main hyperparameters with the
final test metrics), a labelled grid of test images and PR curves of a few labels. Tag names are
the same for every method (`train/loss`, `train/<part>` (with the domain branch: `train/domain_loss`,
`train/domain_acc`, `train/domain_lambda`), `train/lr`, `val/<metric>`,
`val_student/<metric>`, `test/<metric>`, `test/images`, `test/labels`, `test_pr/<label>`), so
runs of one table compare on one chart. Only rank 0 writes. `docs/tensorboard.md` shows how to
read them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import custom_scalars
from torch.utils.tensorboard.summary import hparams as hparams_summary
from torchvision.utils import make_grid

from mlml.config import Config


def flat_hparams(cfg: Config) -> dict[str, str | float | int | bool]:
    """The hyperparameters runs are filtered and sorted by in the HPARAMS tab."""
    return {
        "method": cfg.method_label(),
        "setting": cfg.run.setting,
        "seed": cfg.run.seed,
        "method.name": cfg.method.name,
        "method.loss": cfg.method.loss,
        "method.domain_branch.weight": float(cfg.method.domain_branch.get("weight", 0.0)),
        "data.observation": cfg.data.observation,
        "model.backbone": cfg.model.backbone,
        "optim.lr": cfg.optim.lr,
        "optim.epochs": cfg.optim.epochs,
        "data.batch_size": cfg.data.batch_size,
    }


# Validation metrics logged every evaluation (`mlml.metrics.multilabel_metrics` without thresholds).
VAL_METRICS = ("mAP_macro", "mAP_micro", "auroc_macro", "f1_macro", "f1_micro", "hamming")


def pr_curve_labels(targets: torch.Tensor, frequent: int = 4, rare: int = 2) -> list[int]:
    """Indices of the `frequent` most and `rare` least frequent labels with positives in `targets` (N, C)."""
    counts = targets.sum(0)                                              # (C,)
    present = [c for c in counts.argsort(descending=True, stable=True).tolist() if counts[c] > 0]
    chosen = present[:frequent] + [c for c in present[::-1][:rare] if c not in present[:frequent]]
    return chosen


def table_layout(table: str, metrics: list[str]) -> dict:
    """Custom-scalars layout of a table: one chart per metric, each with a line per run.

    Validation charts match the reported model (`val/<m>`) and any other evaluated model
    (`val_student/<m>` under `method.teacher`); the table's own metrics come first.
    """
    own = [m.split("/", 1)[1] for m in metrics if "/" in m]
    order = [m for m in own if m in VAL_METRICS] + [m for m in VAL_METRICS if m not in own]
    val = {f"val/{m}": ["Multiline", [rf"^val(_[A-Za-z0-9]+)?/{re.escape(m)}$"]] for m in order}
    train = {
        "train/loss": ["Multiline", [r"^train/loss$"]],
        "train/<loss parts>": ["Multiline", [r"^train/(?!loss$|lr$)"]],
        "train/lr": ["Multiline", [r"^train/lr$"]],
    }
    return {f"{table}: validation per epoch (every method)": val, f"{table}: training": train}


def write_table_layout(root: Path, table: str, metrics: list[str]) -> None:
    """Write the layout into an event file of its own at `root` (runs/<table>/), replacing an older one."""
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("events.out.tfevents.*"):
        old.unlink()
    with SummaryWriter(str(root)) as writer:
        writer._get_file_writer().add_summary(custom_scalars(table_layout(table, metrics)))


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.writer: SummaryWriter | None = None

    def start(self, step: int) -> None:
        """Open the event file; on resume, events after `step` from the stopped run are purged."""
        if self.enabled:
            self.writer = SummaryWriter(str(self.run_dir), purge_step=step or None)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def final(self, model: torch.nn.Module, loader, scores: torch.Tensor, targets: torch.Tensor, names: tuple[str, ...], step: int, n: int = 16) -> None:
        """A grid of the first `n` test images, a table of their true and predicted labels, and PR curves.

        PR curves (`test_pr/<label>`) are those of the 4 most and 2 least frequent test labels.
        """
        if not self.writer:
            return
        for c in pr_curve_labels(targets):
            self.writer.add_pr_curve(f"test_pr/{names[c]}", targets[:, c].bool(), scores[:, c].float(), step)
        readable = []                     # scores/targets rows are the split's readable images, in order
        for k in range(len(loader.dataset)):
            if len(readable) >= n:
                break
            item = loader.dataset[k]
            if "image" in item:
                readable.append(item["image"])
        if not readable:
            return
        images = torch.stack(readable)
        self.writer.add_image("test/images", make_grid(images, nrow=8, padding=2), step)
        rows = ["| # | true labels | predicted (p >= 0.5) |", "|---|---|---|"]
        for k in range(len(images)):
            true = ", ".join(names[c] for c in targets[k].nonzero().flatten().tolist())
            pred = ", ".join(f"{names[c]} {scores[k, c]:.2f}" for c in (scores[k] >= 0.5).nonzero().flatten().tolist())
            rows.append(f"| {k} | {true} | {pred} |")
        self.writer.add_text("test/labels", "\n".join(rows), step)

    def hparams(self, cfg: Config, metrics: dict[str, float]) -> None:
        """Write the HPARAMS-tab record into the run's own event file (not a sub-directory).

        Only the session records: without an experiment record of its own, TensorBoard builds the
        experiment from all runs in view, so `method` and `setting` get the values of every run
        as their (discrete) domains and can be filtered with check boxes.
        """
        if not self.writer:
            return
        wanted = {k: v for k, v in metrics.items() if k.startswith("test")}
        _, session_start, session_end = hparams_summary(flat_hparams(cfg), wanted)
        fw = self.writer._get_file_writer()
        for summary in (session_start, session_end):
            fw.add_summary(summary)
        for k, v in wanted.items():
            self.writer.add_scalar(k, v, 0)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
