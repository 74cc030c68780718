"""Stateful single-positive methods: ROLE, EM + APL, large-loss rejection / correction, SPLC, GR.

Each one keeps something across steps that a plain loss cannot: a learnable table of label
estimates (`role`), per-sample scores and pseudo-negatives (`em_apl`), permanent label corrections
(`ll_cp`), or an epoch schedule (`ll_r`, `ll_ct`, `splc`, `gr`). All state that must survive a resume is
a parameter, a buffer or extra state, so checkpoints carry it.

These methods define their own loss (`own_loss`): `method.loss` is not read, and their
hyperparameters go in `method.args`, typed by each method's `Settings` dataclass (an unknown key,
a wrong type or a value out of range is an error when the config is loaded);
`method.loss_args` and `method.pos_weight` must stay empty / "none" (unless the teacher is on:
they configure its consistency loss). Per-sample state is indexed by `batch["index"]`, the position in the training split,
and written only through each method's `_write_state(index, values)`, which under torch.distributed
all-gathers (index, values) from every rank first: every rank writes the same rows, so the state
stays identical across ranks (tests/test_distributed.py checks it for every registered method).
ROLE's table is a parameter outside DDP; `Method.reduce_gradients` averages its gradient.

Formulas, defaults and schedules: docs/references.md (the papers and their reference code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlml.config import MethodConfig
from mlml.distributed import all_gather_cat, average_row_gradient, gather_rows
from mlml.losses import assume_negative_targets, entropy_from_logits, epr_regulariser, get_loss, large_loss_mask, splc
from mlml.methods.base import Method, MethodContext, register_method
from mlml.settings import must, signature_settings


# ---------------------------------------------------------------------------------------------
# Shared plumbing
# ---------------------------------------------------------------------------------------------


def _train_label_chunks(ctx: MethodContext, name: str, chunk: int = 65536) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(start, targets (n, C), observed (n, C)) over the training split, `chunk` positions at a time."""
    if ctx.train_labels is None:
        raise ValueError(f"method '{name}' needs MethodContext.train_labels (the trainer fills it)")
    for start in range(0, ctx.num_train, chunk):
        targets, observed = ctx.train_labels(np.arange(start, min(start + chunk, ctx.num_train)))
        yield start, targets, observed.bool()


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# ---------------------------------------------------------------------------------------------
# ROLE: Cole et al., "Multi-label learning from single positive labels", CVPR 2021
# ---------------------------------------------------------------------------------------------


def role_loss(logits: Tensor, table_logits: Tensor, targets: Tensor, observed: Tensor, k: float) -> Tensor:
    """ROLE loss of the classifier f (`logits`) and the label estimates g (`table_logits`), both (B, C).

    per entry: 0.5 y [-log f - log g] + 0.5 [BCE(f, sg(g)) + BCE(g, sg(f))], y the observed positive
    (0 on unobserved and observed-negative entries; soft targets enter linearly), sg = stop-gradient;
    plus 0.5 [EPR(f) + EPR(g)] (`epr_regulariser`, k expected positives per image).
    Reduction: mean over B * C, regulariser added after (as in the reference code).
    """
    y = assume_negative_targets(targets, observed)
    p, q = torch.sigmoid(logits), torch.sigmoid(table_logits)
    positive = y * (F.softplus(-logits) + F.softplus(-table_logits))                    # (B, C)
    cross = (
        F.binary_cross_entropy_with_logits(logits, q.detach(), reduction="none")
        + F.binary_cross_entropy_with_logits(table_logits, p.detach(), reduction="none")
    )
    reg = 0.5 * (epr_regulariser(p, k) + epr_regulariser(q, k))
    return (0.5 * positive + 0.5 * cross).mean() + reg


@dataclass
class RoleSettings:
    """`method.args` of `role` (defaults from the paper's reference code; see `ROLE`)."""

    k: float = 1.5
    lr_scale: float = 10.0
    init_pos: float = 0.995
    init_neg: float = 0.005
    init_width: float = 0.1
    seed: int = 0
    max_table_entries: int = 50_000_000

    def __post_init__(self) -> None:
        must(self.k > 0, "k", "> 0", self.k)
        must(self.lr_scale >= 0, "lr_scale", ">= 0", self.lr_scale)
        for name in ("init_pos", "init_neg"):
            must(0 < getattr(self, name) < 1, name, "in (0, 1)", getattr(self, name))
        must(0 <= self.init_width < 0.5, "init_width", "in [0, 0.5)", self.init_width)
        must(self.max_table_entries > 0, "max_table_entries", "> 0", self.max_table_entries)


@register_method("role")
class ROLE(Method):
    """Regularised online label estimation (Cole et al., CVPR 2021).

    A learnable N x C table g of label estimates, stored as logits, is trained jointly with the
    classifier f: each fits the other's (detached) predictions, both fit the observed positives,
    and both are pulled towards k expected positives per image (`role_loss`).

    Args (method.args), defaults from the paper's reference code:
        k: expected positives per image, 1.5 (as the `epr` loss; VOC 1.5, COCO 2.9, NUS 1.9, CUB 31.4).
        lr_scale: learning-rate multiplier of the table, 10. The table has no weight decay.
        init_pos / init_neg: initial estimate of observed positives / negatives, 0.995 / 0.005.
        init_width: unobserved entries start uniform in [logit(0.5 - w), logit(0.5 + w)], w = 0.1.
        seed: seed of that uniform draw, 0 (fixed like data_seed, independent of run.seed).
        max_table_entries: largest N * C accepted, 50_000_000.

    Scale: the table costs 12 bytes per entry with Adam (value + two moments; 16 while its dense
    gradient exists), 1M images x 1K labels = 12 GB, and every step updates the whole table.
    Beyond a few tens of millions of entries use a method without a dense per-sample table
    (ll_r, ll_ct, ll_cp); construction fails above `max_table_entries`.
    Distributed: the table is outside DDP and every rank holds all of it; once per optimiser step
    its gradient is averaged over ranks, sending only the rows the step touched (`reduce_gradients`),
    so Adam updates it identically everywhere.
    """

    Settings = RoleSettings
    own_loss = True

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        n, c = ctx.num_train, ctx.label_space.num_labels
        limit = self.args.max_table_entries
        if n * c > limit:
            raise ValueError(
                f"method 'role': its label table would hold {n:,} x {c:,} = {n * c:,} entries "
                f"(~{12 * n * c / 1e9:.1f} GB with Adam), over method.args.max_table_entries = {limit:,}; "
                "raise the limit if the memory is there, or choose a method without a per-sample table"
            )
        self.table = nn.Parameter(self._initial_table(n, c))                          # (N, C) logits
        self._touched: list[Tensor] = []                  # batch indices since the last optimiser step

    def _initial_table(self, n: int, c: int) -> Tensor:
        a = self.args
        g = torch.Generator().manual_seed(a.seed)
        half_width = _logit(0.5 + a.init_width)
        table = (2 * torch.rand(n, c, generator=g) - 1) * half_width
        for start, targets, observed in _train_label_chunks(self.ctx, "role"):
            block = table[start : start + len(targets)]                                # a view
            block.masked_fill_(observed & (targets > 0.5), _logit(a.init_pos))
            block.masked_fill_(observed & (targets <= 0.5), _logit(a.init_neg))
        return table

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [self.table], "lr_scale": float(self.args.lr_scale), "weight_decay": 0.0}]

    def reduce_gradients(self) -> None:
        """The table's gradient is zero outside the rows of this step's batches: average only those."""
        touched, self._touched = self._touched, []
        if self.table.grad is not None and touched:
            average_row_gradient(self.table.grad, torch.cat(touched))

    def objective(self, outputs: dict[str, dict[str, Tensor]], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = outputs["image"]["logits"].float()                                      # (B, C)
        table_logits = self.table[batch["index"]].float()                                 # (B, C)
        self._touched.append(batch["index"])
        loss = role_loss(logits, table_logits, batch["targets"], batch["observed"], self.args.k)
        return {"loss": loss}


# ---------------------------------------------------------------------------------------------
# EM + APL: Zhou et al., "Acknowledging the unknown for multi-label learning with single
# positive labels", ECCV 2022
# ---------------------------------------------------------------------------------------------


def em_apl_loss(
    logits: Tensor, targets: Tensor, observed: Tensor, pseudo: Tensor, soft: Tensor, alpha: float, beta: float
) -> Tensor:
    """EM on unobserved entries, b * BCE(p, s) on pseudo-negatives, BCE on observed ones. All (B, C).

    observed: -[y log p + (1 - y) log(1 - p)]; unobserved and not `pseudo`: -a H(p);
    `pseudo` (unobserved): -b [s log p + (1 - s) log(1 - p)] with s = `soft`.
    Reduction: mean over B * C.
    """
    y = assume_negative_targets(targets, observed)
    known = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    apl = beta * F.binary_cross_entropy_with_logits(logits, soft, reduction="none")
    em = -alpha * entropy_from_logits(logits)
    return torch.where(observed, known, torch.where(pseudo, apl, em)).mean()


def apl_counts(unobserved: Tensor, epochs: int, warmup: int, proportion: float) -> list[int]:
    """Pseudo-negatives added per class and round: int(proportion * #unobserved_c / (T - W))."""
    return [int(proportion * int(u) / (epochs - warmup)) for u in unobserved]


@dataclass
class EMAPLSettings:
    """`method.args` of `em_apl` (defaults for COCO; see `EMAPL`)."""

    alpha: float = 0.1
    beta: float = 0.9
    warmup: int = 5
    proportion: float = 0.9

    def __post_init__(self) -> None:
        must(self.warmup >= 1, "warmup", ">= 1", self.warmup)
        must(0 <= self.proportion <= 1, "proportion", "in [0, 1]", self.proportion)


@register_method("em_apl")
class EMAPL(Method):
    """Entropy maximisation with asymmetric pseudo-labelling (Zhou et al., ECCV 2022).

    Training: `em_apl_loss`. After a warm-up of W epochs, at the end of each epoch and for each
    class c, the int(0.9 * U_c / (T - W)) lowest-scored unobserved entries that are not yet
    pseudo-negatives become pseudo-negatives with soft target s = their recorded p (U_c the
    unobserved entries of class c in the training split, T the number of epochs). Rounds run
    after epochs W, ..., T - 1 (1-based), T - W rounds in all; the reference also runs one after
    the last epoch, which cannot change training.

    Scores are the p of each sample's last training forward pass (train mode, augmented view),
    recorded during the epoch; the reference code scores the training set in an extra pass at the
    end of the epoch instead. A sample never seen yet (e.g. dropped with the last incomplete batch)
    is not a candidate; one not seen this epoch keeps its last score.

    Args (method.args), defaults for COCO:
        alpha: weight a of the entropy term, 0.1 (VOC 0.2, NUS 0.1, CUB 0.01).
        beta: weight b of the pseudo-negative BCE, 0.9 (VOC 0.02, NUS 0.2, CUB 0.4).
        warmup: W, 5 (VOC 5, NUS 4, CUB 3), >= 1; clipped to T - 1 so that at least one round runs.
        proportion: fraction of unobserved entries made pseudo-negative in total, 0.9.

    State: scores (N, C) float16, pseudo-negative mask (N, C) bool and soft targets (N, C)
    float16, 5 bytes per entry (1M x 1K = 5 GB), on every rank; each step's scores are gathered
    from all ranks (`_write_state`), so every rank picks the same pseudo-negatives.
    """

    Settings = EMAPLSettings
    own_loss = True

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.warmup = min(self.args.warmup, ctx.epochs - 1)
        n, c = ctx.num_train, ctx.label_space.num_labels
        unobserved = torch.zeros(c, dtype=torch.long)
        for _, _, observed in _train_label_chunks(ctx, "em_apl"):
            unobserved += (~observed).sum(0)
        self.register_buffer("unobserved", unobserved)                                       # (C,)
        # +inf = no candidate: never scored yet, or observed
        self.register_buffer("scores", torch.full((n, c), math.inf, dtype=torch.float16))   # (N, C)
        self.register_buffer("pseudo", torch.zeros(n, c, dtype=torch.bool))                  # (N, C)
        self.register_buffer("soft", torch.zeros(n, c, dtype=torch.float16))                 # (N, C)

    def selects_after(self, epoch: int) -> bool:
        """Whether a pseudo-labelling round runs at the end of `epoch` (0-based)."""
        return self.warmup <= epoch + 1 < self.ctx.epochs

    def objective(self, outputs: dict[str, dict[str, Tensor]], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = outputs["image"]["logits"].float()                                      # (B, C)
        index, observed = batch["index"], batch["observed"]
        pseudo = self.pseudo[index] & ~observed
        soft = self.soft[index].float()
        a = self.args
        loss = em_apl_loss(logits, batch["targets"], observed, pseudo, soft, a.alpha, a.beta)
        self._write_state(index, torch.sigmoid(logits.detach()).masked_fill(observed, math.inf))
        return {"loss": loss, "pseudo_negatives": pseudo.float().mean()}

    @torch.no_grad()
    def _write_state(self, index: Tensor, values: Tensor) -> None:
        """Record scores (B, C) of training positions `index` (B,), gathered from every rank."""
        index, values = gather_rows(index, values)
        self.scores[index] = values.to(self.scores.dtype)

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> None:
        if not self.selects_after(epoch):
            return
        # Reads only the scores buffer, identical on every rank once `_write_state` gathers.
        counts = apl_counts(self.unobserved, self.ctx.epochs, self.warmup, self.args.proportion)
        for c, count in enumerate(counts):
            column = self.scores[:, c].float()                                          # (N,)
            candidates = ~self.pseudo[:, c] & torch.isfinite(column)
            count = min(count, int(candidates.sum()))
            if count == 0:
                continue
            rows = torch.topk(column.masked_fill(~candidates, math.inf), count, largest=False).indices
            self.pseudo[rows, c] = True
            self.soft[rows, c] = self.scores[rows, c]


# ---------------------------------------------------------------------------------------------
# Large loss rejection / correction: Kim et al., "Large loss matters in weakly supervised
# multi-label classification", CVPR 2022
# ---------------------------------------------------------------------------------------------


def _ceil(x: float) -> int:
    """ceil, blind to float noise below 1e-9 (B*C*t*d/100 is often an integer in exact arithmetic)."""
    return math.ceil(round(x, 9))


def large_loss_count(epoch: int, batch_size: int, num_classes: int, delta_rel: float) -> int:
    """k = ceil(B * C * (t - 1) * d / 100) entries modified per batch; t = epoch + 1, d in percent."""
    return _ceil(batch_size * num_classes * epoch * delta_rel / 100)


def large_loss_modified(
    logits: Tensor, targets: Tensor, observed: Tensor, k: int, correct: bool
) -> tuple[Tensor, Tensor]:
    """Assume-negative BCE with the k largest unobserved losses set to 0 or corrected to target 1.

    Returns the loss (mean over B * C) and the bool (B, C) mask of the modified entries.
    """
    per_entry = F.binary_cross_entropy_with_logits(logits, assume_negative_targets(targets, observed), reduction="none")
    mask = large_loss_mask(per_entry.detach(), ~observed, k)
    replaced = F.softplus(-logits) if correct else torch.zeros_like(per_entry)         # -log p or 0
    return torch.where(mask, replaced, per_entry).mean(), mask


@dataclass
class LargeLossSettings:
    """`method.args` of ll_r / ll_ct / ll_cp: delta_rel, the share d in percent (per epoch for ll_r, ll_ct)."""

    delta_rel: float = 0.2

    def __post_init__(self) -> None:
        must(0 <= self.delta_rel <= 100, "delta_rel", "in [0, 100] (percent)", self.delta_rel)


class _LargeLoss(Method):
    """Shared schedule of ll_r / ll_ct / ll_cp; subclasses set `correct`."""

    correct = False
    Settings = LargeLossSettings
    own_loss = True

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.epoch = 0                         # set by on_epoch_start, which the trainer calls on resume too

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def count(self, batch_size: int, num_classes: int) -> int:
        """Entries modified in a batch this epoch."""
        return large_loss_count(self.epoch, batch_size, num_classes, self.args.delta_rel)

    def objective(self, outputs: dict[str, dict[str, Tensor]], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = outputs["image"]["logits"].float()                                      # (B, C)
        targets, observed = self.labels(batch)
        loss, mask = large_loss_modified(logits, targets, observed, self.count(*logits.shape), self.correct)
        self.after_step(batch["index"], mask)
        return {"loss": loss, "modified": mask.sum().float()}

    def labels(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return batch["targets"], batch["observed"]

    def after_step(self, index: Tensor, modified: Tensor) -> None:
        """Hook for permanent corrections (ll_cp)."""


@register_method("ll_r")
class LargeLossRejection(_LargeLoss):
    """LL-R (Kim et al., CVPR 2022): reject (zero) the largest unobserved losses of each batch.

    Assume-negative BCE on logits, mean over B * C. From epoch t = 2 on (epoch index 1), the
    k = ceil(B * C * (t - 1) * d) largest losses among unobserved entries are set to 0.

    Args (method.args):
        delta_rel: d in percent per epoch as in the reference code, 0.2 (= 0.002 per epoch; the
            authors' grid is 0.1 ... 0.5).

    BoostLU (Kim et al., CVPR 2023) runs on top of it as a model setting, `model.boostlu = 5` (with
    delta_rel = 0.5 as released; docs/references.md).
    """


@register_method("ll_ct")
class LargeLossCorrectionTemporary(_LargeLoss):
    """LL-Ct (Kim et al., CVPR 2022): as ll_r, but the k largest unobserved losses are computed
    against target 1 (-log p) for that step instead of being zeroed. Args: delta_rel, 0.2 (percent)."""

    correct = True


@register_method("ll_cp")
class LargeLossCorrectionPermanent(_LargeLoss):
    """LL-Cp (Kim et al., CVPR 2022): from epoch index 1 on, the k = ceil(B * C * d) largest
    unobserved losses of each batch are corrected to target 1, in that step and permanently:
    later batches see those entries as observed positives.

    Args (method.args): delta_rel, d in percent, 0.2 (k does not grow with the epoch here).

    The corrections are kept as a sorted tensor of flat indices i * C + c (8 bytes per corrected
    entry, looked up with `searchsorted`), not as an N x C table; they travel in checkpoints as
    extra state. (The released code compares the scheme name with `is`, so its ll_cp likely ran as
    ll_ct.) Corrections made on any rank are gathered to every rank (`_write_state`).
    """

    correct = True

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self._corrected = torch.zeros(0, dtype=torch.long)                        # sorted flat indices

    def count(self, batch_size: int, num_classes: int) -> int:
        return _ceil(batch_size * num_classes * self.args.delta_rel / 100) if self.epoch >= 1 else 0

    def corrected_entries(self) -> Tensor:
        """(M, 2) long: (training position, class) of every permanent correction, sorted."""
        c = self.ctx.label_space.num_labels
        return torch.stack([self._corrected // c, self._corrected % c], dim=1)

    def _corrected_mask(self, index: Tensor, num_classes: int) -> Tensor:
        """bool (B, C): entries of positions `index` corrected so far."""
        flat = index[:, None] * num_classes + torch.arange(num_classes, device=index.device)      # (B, C)
        if self._corrected.numel() == 0:
            return torch.zeros_like(flat, dtype=torch.bool)
        if self._corrected.device != index.device:
            self._corrected = self._corrected.to(index.device)
        pos = torch.searchsorted(self._corrected, flat).clamp(max=self._corrected.numel() - 1)
        return self._corrected[pos] == flat

    def labels(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        targets, observed = batch["targets"], batch["observed"]
        corrected = self._corrected_mask(batch["index"], targets.shape[1])
        return targets.masked_fill(corrected, 1.0), observed | corrected

    def after_step(self, index: Tensor, modified: Tensor) -> None:
        self._write_state(index, modified)

    @torch.no_grad()
    def _write_state(self, index: Tensor, values: Tensor) -> None:
        """Add the corrections `values` (B, C) bool of positions `index` (B,), gathered from every rank."""
        index, values = all_gather_cat(index), all_gather_cat(values)            # the union over ranks
        num_classes = values.shape[1]
        flat = (index[:, None] * num_classes + torch.arange(num_classes, device=index.device))[values]
        self._corrected = torch.cat([self._corrected.to(flat.device), flat]).unique()          # sorted

    def get_extra_state(self) -> dict:
        return {"corrected": self._corrected.cpu()}

    def set_extra_state(self, state: dict) -> None:
        self._corrected = state["corrected"].long().clone()


# ---------------------------------------------------------------------------------------------
# SPLC: Zhang et al., "Simple and robust loss design for multi-label learning with missing
# labels", 2021
# ---------------------------------------------------------------------------------------------


@register_method("splc")
class SPLC(Method):
    """The `splc` loss with its pseudo-positives off in epoch 0 and on from epoch 1, as in the paper.

    Args (method.args): the loss's keyword parameters but `pseudo_label`, with its defaults
    (tau 0.6, margin 1, gamma 2, reduction "sum"); the settings are derived from its signature.
    """

    Settings = signature_settings(splc, exclude=("pseudo_label",))
    own_loss = True

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.on_epoch_start(0)

    def on_epoch_start(self, epoch: int) -> None:
        args = {k: getattr(self.args, k) for k in self.cfg.args}      # the loss keeps its own defaults
        self.loss = get_loss("splc", pseudo_label=epoch >= 1, **args)

    def objective(self, outputs: dict[str, dict[str, Tensor]], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = outputs["image"]["logits"].float()                                      # (B, C)
        return {"loss": self.loss(logits, batch["targets"], batch["observed"])}


# ---------------------------------------------------------------------------------------------
# GR: Chen et al., "Boosting single positive multi-label classification with generalized robust
# loss", IJCAI 2024
# ---------------------------------------------------------------------------------------------


@dataclass
class GRSettings:
    """`method.args` of `gr`: where (w, b) and (mu, sigma) start and end, and q2, q3.

    Defaults: the authors' released config (github.com/yan4xi1/GRLoss, config.py: beta = [w_0, w_T,
    b_0, b_T] = [0, 2, -2, -2], alpha = [mu_0, sigma_0, mu_T, sigma_T] = [0.5, 2, 0.8, 0.5],
    q2q3 = [0.01, 1]), the values its README gives as the example; per-dataset values were not
    published with the code.
    """

    w_start: float = 0.0
    w_end: float = 2.0
    b_start: float = -2.0
    b_end: float = -2.0
    mu_start: float = 0.5
    mu_end: float = 0.8
    sigma_start: float = 2.0
    sigma_end: float = 0.5
    q2: float = 0.01
    q3: float = 1.0

    def __post_init__(self) -> None:
        for name in ("sigma_start", "sigma_end"):
            must(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in ("q2", "q3"):
            must(getattr(self, name) >= 0, name, ">= 0 (0 = the log loss)", getattr(self, name))


def gr_schedule(epoch: int, epochs: int, s: GRSettings) -> dict[str, float]:
    """(w, b, mu, sigma) of the `gr` loss in `epoch` (0-based) of `epochs`, linear as in the reference.

    beta = (w, b) moves by epoch / T from its start (so it starts there and stops one step short of
    its end); alpha = (mu, sigma) by (epoch + 1) / T (one step in already in the first epoch, at its
    end in the last). This is the released train.py with linear_init = 0 (1-based e = epoch + 1:
    max(e - 1, 0) / T for beta, e / T for alpha).
    """
    f_beta, f_alpha = epoch / epochs, min(epoch + 1, epochs) / epochs
    return {
        "w": s.w_start + (s.w_end - s.w_start) * f_beta,
        "b": s.b_start + (s.b_end - s.b_start) * f_beta,
        "mu": s.mu_start + (s.mu_end - s.mu_start) * f_alpha,
        "sigma": s.sigma_start + (s.sigma_end - s.sigma_start) * f_alpha,
    }


@register_method("gr")
class GR(Method):
    """GR loss (Chen et al., IJCAI 2024) with its hyperparameters moved linearly over the epochs.

    Each epoch trains with the `gr` loss (mlml/losses.py; the formula there and in
    docs/references.md) at (w, b, mu, sigma) = `gr_schedule(epoch)`: the soft pseudo-label
    k(p) = sigmoid(w p + b) of an unobserved label grows more confident as w rises, and the weight
    v(p) = exp(-(p - mu)^2 / (2 sigma^2)) narrows around mu.

    Args (method.args): `GRSettings` (start and end of w, b, mu, sigma; q2, q3), defaults from the
    authors' released config. Not implemented: the reference's `linear_init` (a frozen backbone for
    the first epochs, default 0 there) and its optional learned label estimator (`is_train`, off by
    default there).
    """

    Settings = GRSettings
    own_loss = True

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.on_epoch_start(0)

    def on_epoch_start(self, epoch: int) -> None:
        self.params = gr_schedule(epoch, self.ctx.epochs, self.args)
        self.loss = get_loss("gr", q2=self.args.q2, q3=self.args.q3, **self.params)

    def objective(self, outputs: dict[str, dict[str, Tensor]], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = outputs["image"]["logits"].float()                                      # (B, C)
        return {"loss": self.loss(logits, batch["targets"], batch["observed"])}
