"""TensorBoard logging of a run: scalars, hyperparameters with final metrics, labelled image grids.

Tag names are the same for every method (`train/loss`, `train/<part>`, `train/lr`, `val/<metric>`,
`val_teacher/<metric>`, `test/<metric>`), so runs of one table compare on one chart. Only rank 0
writes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
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
        "data.observation": cfg.data.observation,
        "model.backbone": cfg.model.backbone,
        "optim.lr": cfg.optim.lr,
        "optim.epochs": cfg.optim.epochs,
        "data.batch_size": cfg.data.batch_size,
    }


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
        """A grid of the first `n` test images, and a table of their true and predicted labels."""
        if not self.writer:
            return
        readable = []                     # scores/targets rows are the split's readable images, in order
        for k in range(len(loader.dataset)):
            item = loader.dataset[k]
            if "image" in item:
                readable.append(item["image"])
            if len(readable) == n:
                break
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
        """Write the HPARAMS-tab record into the run's own event file (not a sub-directory)."""
        if not self.writer:
            return
        wanted = {k: v for k, v in metrics.items() if k.startswith("test")}
        exp, ssi, sei = hparams_summary(flat_hparams(cfg), wanted)
        fw = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)
        for k, v in wanted.items():
            self.writer.add_scalar(k, v, 0)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
