"""The method interface: how one training step turns a batch into a loss.

A method is an `nn.Module` registered by name. It owns whatever it adds to the model (an EMA
teacher, a per-sample label table, a domain head), so the optimiser and checkpoints see it through
`parameters()` / `state_dict()`. The trainer knows nothing of any particular method: it calls

    method.on_epoch_start(epoch)
    parts = method.run_step(batch, model)           # training_step [+ domain branch]: {"loss": scalar, <part>: scalar, ...}
    (backward; once per optimiser step: method.reduce_all_gradients(); optimiser step)
    method.end_step(model, step)                    # [domain branch schedule] + on_step_end
    method.on_epoch_end(epoch)

and evaluates every model in `method.eval_models(model)`. Subclasses implement `training_step`,
`reduce_gradients` and `on_step_end`; the base class's `run_step`, `reduce_all_gradients` and
`end_step` wrap them with the adversarial domain branch (mlml/methods/domain.py) when
`method.domain_branch` turns it on, so every method composes with it without code of its own.

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
from mlml.methods.domain import DomainBranch, domain_branch_args
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
    # The answer key, for logged diagnostics only (pseudo-label precision): training-split positions
    # (B,) long -> the hidden full labels bool (B, C) on the same device. Never a training signal:
    # tests/test_methods.py scrambles it and checks that no method's loss or gradients change.
    hidden_labels_for_diagnostics: Callable[[torch.Tensor], torch.Tensor] | None = None


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
        branch = domain_branch_args(cfg.domain_branch)
        self.domain_branch = (DomainBranch(branch, ctx.feature_dim, ctx.num_domains, ctx.epochs * ctx.steps_per_epoch)
                              if branch["weight"] > 0 else None)

    def run_step(self, batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """`training_step`, plus the domain branch's loss and parts when it is on.

        The branch sees the features of the first forward of the student's backbone in
        `training_step` (caught by a forward hook that exists only during this call, so no second
        forward is needed and teachers, which are other modules, are not seen). Its rows are
        `batch["image"]`, possibly followed by further views of the same images in the same order
        (as MeanTeacher's concatenated weak + strong forward): each copy gets the batch's domains.
        """
        if self.domain_branch is None:
            return self.training_step(batch, model)
        backbone = getattr(getattr(model, "module", model), "backbone", None)   # DDP wraps the model
        if backbone is None:
            raise ValueError("method.domain_branch needs a model with a `backbone` (features (B, D))")
        caught: list[torch.Tensor] = []
        hook = backbone.register_forward_hook(lambda module, inputs, output: caught.append(output) if not caught else None)
        try:
            parts = self.training_step(batch, model)
        finally:
            hook.remove()
        domain = batch["domain"]
        if not caught or len(caught[0]) % len(domain):
            raise ValueError("method.domain_branch: the method's first student forward was not on the batch's images")
        features = caught[0].float()                                       # (k B, D)
        branch = self.domain_branch(features, domain.repeat(len(features) // len(domain)))
        return {**parts, **branch, "loss": parts["loss"] + branch["loss"]}

    def diagnostic_truth(self, index: torch.Tensor) -> torch.Tensor | None:
        """bool (B, C) hidden full labels of training positions `index`, for logged diagnostics only.

        None when the run has no answer key (outside the trainer). Whatever a method computes from
        it must not reach its loss.
        """
        channel = self.ctx.hidden_labels_for_diagnostics
        if channel is None:
            return None
        with torch.no_grad():
            return channel(index)

    def reduce_all_gradients(self) -> None:
        """`reduce_gradients`, plus the domain head's gradients averaged over ranks (outside DDP)."""
        self.reduce_gradients()
        if self.domain_branch is not None:
            average_gradients(self.domain_branch.parameters())

    def end_step(self, model: nn.Module, step: int) -> None:
        """After every optimiser step: the domain branch's schedule moves to `step`, then `on_step_end`."""
        if self.domain_branch is not None:
            self.domain_branch.step.fill_(step)
        self.on_step_end(model, step)

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
        ranks, as DDP does for the model's. A no-op in one process. (The domain branch's are
        averaged by `reduce_all_gradients`.)
        """
        average_gradients(p for n, p in self.named_parameters() if not n.startswith("domain_branch."))

    def eval_models(self, model: nn.Module) -> dict[str, nn.Module]:
        """The models to evaluate, by name; the first is the one tables report."""
        return {"student": model}

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser groups for the method's own trainable parameters (none by default).

        Subclasses may override it; the domain branch is not theirs to list (see `optimizer_groups`)."""
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("domain_branch.")]
        return [{"params": params, "lr_scale": 1.0}] if params else []

    def optimizer_groups(self, lr: float) -> list[dict]:
        """What the trainer optimises besides the model: `param_groups` plus the domain head."""
        groups = self.param_groups(lr)
        if self.domain_branch is not None:
            groups.append({"params": list(self.domain_branch.parameters()), "weight_decay": 0.0,
                           "lr_scale": float(self.domain_branch.args["lr_scale"])})
        return groups
