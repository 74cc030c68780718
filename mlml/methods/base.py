"""The method interface: how one training step turns a batch into a loss.

A method is an `nn.Module` registered by name. It owns whatever it adds to the model (an EMA
teacher, a per-sample label table, a domain head), so the optimiser and checkpoints see it through
`parameters()` / `state_dict()`. The trainer knows nothing of any particular method: it calls

    method.on_epoch_start(epoch)
    parts = method.training_step(batch, model)      # {"loss": scalar, <part>: scalar, ...}
    (backward; once per optimiser step: method.reduce_gradients(); optimiser step)
    method.on_step_end(model, step)
    method.on_epoch_end(epoch)

and evaluates every model in `method.eval_models(model)`.

Under torch.distributed (torchrun) `model` is the DDP-wrapped model in `training_step` and the
unwrapped one in `on_step_end` / `eval_models`; the method itself is not wrapped. Its state must
stay identical on every rank: parameters get their gradients averaged by `reduce_gradients`,
per-sample writes gather every rank's rows first (`mlml.distributed.gather_rows`), and an EMA
teacher updated from the (identical) unwrapped student in `on_step_end` needs nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from mlml.config import MethodConfig
from mlml.distributed import average_gradients
from mlml.labels import LabelSpace
from mlml.registry import Registry

METHODS: Registry = Registry("method", entry_point_group="mlml.methods")
register_method = METHODS.register


@dataclass
class MethodContext:
    """What a method may know about the run when it is built."""

    label_space: LabelSpace
    num_train: int                 # size of the training split (per-sample state is indexed 0..N-1)
    steps_per_epoch: int
    epochs: int
    num_domains: int = 1
    feature_dim: int = 0
    positives: torch.Tensor = field(default_factory=lambda: torch.zeros(0))   # (C,) observed positives per label
    negatives: torch.Tensor = field(default_factory=lambda: torch.zeros(0))   # (C,) observed negatives per label
    # positions (0..N-1) in the training split -> (targets float (n, C), observed bool (n, C)),
    # the labels training sees (never the ground truth); None outside the trainer
    train_labels: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]] | None = None
    # the student model, unwrapped and on its device (a teacher starts as its copy); None outside the trainer
    student: nn.Module | None = None


class Method(nn.Module):
    """Base class. Subclasses implement `training_step` and, when they need them, the hooks."""

    #: view name -> augmentation; "weak" stands for the configured `data.augment`.
    views: dict[str, str] = {"image": "weak"}
    #: config overrides the method cannot run without (e.g. a head), for registry-wide tests and docs.
    requires: tuple[str, ...] = ()
    #: True when a training step may leave some model parameters without a gradient (a branch
    #: used only on some steps): DDP then runs with find_unused_parameters (slower).
    find_unused_parameters: bool = False

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx

    def training_step(self, batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_epoch_start(self, epoch: int) -> None:
        """Called before the first step of every epoch (0-based)."""

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Called after every optimiser step with the global step count (1-based)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called after the last step of every epoch."""

    def reduce_gradients(self) -> None:
        """Called on every rank after the backward of the last micro-batch, before the optimiser step.

        The method's own parameters are outside DDP: by default their gradients are averaged over
        ranks, as DDP does for the model's. A no-op in one process.
        """
        average_gradients(self.parameters())

    def eval_models(self, model: nn.Module) -> dict[str, nn.Module]:
        """The models to evaluate, by name; the first is the one tables report."""
        return {"student": model}

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser groups for the method's own trainable parameters (none by default)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr_scale": 1.0}] if params else []
