"""The trainer: one loop for every method, on CPU or GPU, one process or many (torchrun).

Reading order: `train()` builds everything from the config, `Trainer.fit()` runs the epochs,
`Trainer.train_epoch()` the steps, `Trainer.validate()` / `Trainer.finish()` the evaluation.
Checkpoints (`checkpoints/last.pt`, `checkpoints/best.pt`) hold the model, the method's state, the
optimiser, the AMP scaler, RNG states, the position in the epoch and the config, and are written
atomically (`mlml.checkpoint`), so `--resume` continues a stopped run exactly where it stopped.

Reliability (docs/reliability.md): nothing is written to the run directory before the config and the
data are built and the directory is known not to hold another run; a lock file (`run.lock`, owner pid
and host) keeps a second process out. `last.pt` is written at epoch ends, every `run.checkpoint_every`
steps, every `run.checkpoint_minutes` minutes, and when SIGTERM or SIGUSR1 arrives: the step in
progress finishes, every rank agrees to stop after it, `last.pt` is written and the process exits
with `PREEMPTED_EXIT_CODE`. The previous `last.pt` is kept as `last.prev.pt`; resume falls back to
it when `last.pt` is unreadable, and refuses a checkpoint of another config unless told otherwise.
A state with non-finite parameters or buffers is never written.

Under torchrun (N processes, one per GPU or CPU share): `data.batch_size` is the global batch of one
optimiser step, split into N equal per-rank batches, each split again into `optim.accumulate`
micro-batches (backward without gradient all-reduce, `no_sync`, on all but the last). The model is
wrapped in DDP; the method (an EMA teacher, ROLE's table, per-sample state) is not, and keeps
itself identical on every rank (`mlml.methods.base`). After every optimiser step rank 0's buffers
(BatchNorm statistics) are broadcast, so at step boundaries every rank holds the same model.
Only rank 0 writes files; checkpoints are read by rank 0 and broadcast. A step count means the same
samples at any world size, so a checkpoint resumes at another world size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mlml.checkpoint import (
    CheckpointError, config_differences, first_non_finite, load_checkpoint, previous_path, rng_state, save_checkpoint,
    set_rng_state,
)
from mlml.config import Config, ConfigError, config_hash, run_dir_for, to_toml, validate_config
from mlml.data.dataset import epoch_sampler
from mlml.data.pipeline import Data, build_data, split_hash
from mlml.distributed import (
    DistInfo,
    all_gather_objects,
    barrier,
    broadcast_buffers,
    broadcast_object,
    init_distributed,
    max_over_ranks,
    mean_over_ranks,
    min_over_ranks,
    rank,
    resolve_device,
    restart_count,
)
from mlml.files import FileLock, atomic_write_text
from mlml.evaluation import (
    calibrate_thresholds, check_selection, classes_without_positives, few_positive_classes, group_metrics, per_class_ap, predict,
    softmax_groups,
    split_metrics,
)
from mlml.inference import inference_metadata
from mlml.methods import Method, MethodContext, build_method, method_views
from mlml.models import build_model
from mlml.provenance import environment
from mlml.settings import upgrade_stored_config
from mlml.tensorboard import RunLogger

PREEMPTED_EXIT_CODE = 75      # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after writing last.pt; run again with --resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after writing `checkpoints/last.pt`; `--resume` continues it."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"stopped by {signal.Signals(signum).name} after optimiser step {step}; "
                         f"checkpoint {path} written; continue with --resume")


class ConfigChangedError(ConfigError):
    """`--resume` of a checkpoint written by another config."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at optimiser step `step` (0-based): linear warm-up, then cosine or
    constant (`schedule`, checked when the config is loaded)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(cfg: Config, model: nn.Module, method: Method) -> torch.optim.Optimizer:
    """Model parameters (no weight decay on biases and norms) plus the method's own groups."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        *method.optimizer_groups(cfg.optim.lr),
    ]
    for g in groups:
        g["lr"] = cfg.optim.lr * g["lr_scale"]
    if cfg.optim.name == "sgd":                  # optim.name is adamw or sgd (checked at load time)
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=True)
    # On a GPU the fused kernel: one launch for all parameters instead of several per tensor.
    fused = {"fused": True} if all(p.is_cuda for g in groups for p in g["params"]) and groups[0]["params"] else {}
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, **fused)


def amp_dtype_for(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that have it, else fp16 (with a grad scaler); None = full precision.

    On a CPU only when asked (`optim.amp = "on"`): bf16, about 2x faster for the small CNN where
    the CPU has bf16 units (AVX512-BF16, AMX; README, "Performance"), slower where it has not.
    """
    if cfg.optim.amp == "off":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cfg.optim.amp == "on" else None


def observed_label_counts(data: Data, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(C,) observed positives and observed-or-assumed negatives over the training split."""
    rows = data.splits["train"]
    pos = torch.zeros(data.label_space.num_labels, dtype=torch.long)
    for i in range(0, len(rows), chunk):
        r = rows[i : i + chunk]
        targets, observed = data.observation(r, data.labels.dense(r))
        pos += (targets.bool() & observed).sum(0)
    return pos, len(rows) - pos


def per_rank_batch(batch_size: int, world_size: int, accumulate: int) -> int:
    """The loader batch of each rank: the global batch split over ranks (then into micro-batches)."""
    if batch_size % (world_size * accumulate):
        raise ValueError(
            f"data.batch_size {batch_size} (the global batch of one optimiser step) must be divisible by "
            f"world size x optim.accumulate = {world_size} x {accumulate}; choose a multiple of {world_size * accumulate}"
        )
    return batch_size // world_size


def convert_sync_batchnorm(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """model.sync_bn: BatchNorm -> SyncBatchNorm (statistics over the global batch); GPU only."""
    if info.enabled and device.type == "cpu":
        raise ValueError("model.sync_bn = true needs GPUs: SyncBatchNorm does not run on CPU (gloo); set it to false")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def on_rank_0(fn, *args):
    """`fn(*args)` run by rank 0 only; its result, or the exception it raised, on every rank."""
    result, error = None, None
    if rank() == 0:
        try:
            result = fn(*args)
        except Exception as err:                  # noqa: BLE001 - re-raised on every rank below
            error = err
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def read_checkpoint(path: Path) -> dict:
    """Rank 0 reads the file, every rank gets its content (no shared file system needed to resume)."""
    return on_rank_0(load_checkpoint, path)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of rank `rank`'s random stream (ranks > 0), started at optimiser step `step`."""
    return (seed * 1_000_003 + rank * 7919 + step) % 2**63


class Trainer:
    """Holds the run's objects; `fit()` trains, validates, checkpoints and writes `metrics.json`."""

    def __init__(self, cfg: Config, run_dir: Path, info: DistInfo) -> None:
        self.cfg, self.run_dir, self.info = cfg, run_dir, info
        self.device = resolve_device(cfg.run.device, info)
        if self.device.type == "cuda":                      # fixed training shapes: let cuDNN pick its fastest kernels
            torch.backends.cudnn.benchmark = True
        seed_everything(cfg.run.seed)                       # same initial model on every rank
        self.data = build_data(cfg.data)
        self.model = build_model(cfg.model, self.data.label_space).to(self.device)
        if cfg.model.sync_bn:
            self.model = convert_sync_batchnorm(self.model, self.device, info)
        self.batch_per_rank = per_rank_batch(cfg.data.batch_size, info.world_size, cfg.optim.accumulate)
        views = {name: (cfg.data.augment if kind == "weak" else kind) for name, kind in self._method_views().items()}
        self.train_loader = self.data.loader("train", views, cfg.run.seed, info.rank, info.world_size, self.batch_per_rank)
        self.steps_per_epoch = len(self.train_loader)
        positives, negatives = observed_label_counts(self.data)
        train_rows = self.data.splits["train"]
        ctx = MethodContext(
            label_space=self.data.label_space,
            num_train=len(self.data.splits["train"]),
            steps_per_epoch=self.steps_per_epoch,
            epochs=cfg.optim.epochs,
            num_domains=self.data.observation.num_domains,
            feature_dim=self.model.backbone.out_dim,
            positives=positives,
            negatives=negatives,
            train_labels=lambda idx: self.data.observation(train_rows[idx], self.data.labels.dense(train_rows[idx])),
            student=self.model,
            hidden_labels_for_diagnostics=lambda idx: self.data.hidden_labels("train", idx.cpu().numpy()).to(idx.device),
        )
        self.method = build_method(cfg.method, ctx).to(self.device)
        check_selection(cfg.eval.select, cfg.data.val_labels == "full", list(self.method.models_to_evaluate(self.model)), self.data.label_space)
        if info.rank > 0:                                   # own random stream per rank (dropout, ...)
            seed_everything(rank_seed(cfg.run.seed, info.rank, 0))
        self.ddp_model = self.model
        if info.enabled:
            # broadcast_buffers=True (the default): rank 0's BatchNorm statistics at every forward.
            self.ddp_model = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.model.find_unused_parameters or type(self.method).find_unused_parameters,
            )
        if cfg.model.compile:                               # training forward only; checkpoints hold self.model
            self.ddp_model = torch.compile(self.ddp_model)
        self.optimizer = build_optimizer(cfg, self.model, self.method)
        self.amp_dtype = amp_dtype_for(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.eval_loaders = {
            s: self.data.loader(s, {"image": "none"}, cfg.run.seed, info.rank, info.world_size, 2 * self.batch_per_rank)
            for s in ("val", "test")
        }
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best, self.best_epoch, self.history = -math.inf, -1, []
        self.skipped_images = {"train": 0, "val": 0, "test": 0}   # unreadable images met (per pass)
        self.logger = RunLogger(run_dir, enabled=info.is_main)
        self.train_seconds_before = 0.0                     # training time of earlier segments (resumes)
        self.segment_start = time.perf_counter()
        self.last_saved = time.monotonic()                  # for run.checkpoint_minutes
        self.stop_signal = 0                                # set by the SIGTERM/SIGUSR1 handler
        self.on_validate: Callable[[int, dict], None] | None = None   # see train()

    def _method_views(self) -> dict[str, str]:
        return method_views(self.cfg.method)

    # ------------------------------------------------------------------ checkpoints
    def train_seconds(self) -> float:
        """Training time of this run so far, summed over the segments a resume continued."""
        return self.train_seconds_before + time.perf_counter() - self.segment_start

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "skipped_images": self.skipped_images,
            "train_seconds": self.train_seconds(),
            "world_size": self.info.world_size,
            "rng": all_gather_objects(rng_state()),          # one per rank
            "config": self.cfg.to_dict(),
            "label_space": self.data.label_space.to_dict(),
            "inference": self.inference_metadata(),
        }

    def inference_metadata(self, thresholds: torch.Tensor | None = None, state_dict: dict | None = None) -> dict:
        """What `mlml predict` needs from a checkpoint (mlml.inference); thresholds once calibrated."""
        return inference_metadata(dataclasses.asdict(self.cfg.model), self.data.label_space, self.data.image_size,
                                  self.cfg.eval.threshold, thresholds, state_dict)

    def save(self, name: str) -> None:
        """Called on every rank (it gathers their RNG states); rank 0 writes.

        A state with a non-finite model parameter or buffer, method parameter (an EMA teacher, a label
        table) or optimiser value is not written (every rank holds the same state at step boundaries, so
        every rank raises): the last finite checkpoint stays. Method buffers are not checked: some use
        infinity as "not seen yet" (em_apl's scores).
        """
        path = self.run_dir / "checkpoints" / name
        bad = first_non_finite({"model": self.model.state_dict(), "method": dict(self.method.named_parameters()),
                                "optimizer": self.optimizer.state_dict()["state"]})
        if bad:
            raise FloatingPointError(
                f"not writing {path}: '{bad}' has non-finite values at epoch {self.epoch + 1}, step {self.step_in_epoch} "
                f"(the run diverged); the checkpoints already written are finite and kept; lower optim.lr or check the loss"
            )
        state = self.state()
        if self.info.is_main:
            save_checkpoint(state, path, keep_previous=name == "last.pt")
        if name == "last.pt":
            self.last_saved = time.monotonic()

    def load(self, path: Path, ckpt: dict | None = None) -> None:
        ckpt = ckpt if ckpt is not None else read_checkpoint(path)
        self.model.load_state_dict(ckpt["model"])
        self.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.global_step = ckpt["epoch"], ckpt["global_step"]
        self.best, self.best_epoch, self.history = ckpt["best"], ckpt["best_epoch"], ckpt["history"]
        self.skipped_images = ckpt.get("skipped_images", self.skipped_images)
        self.train_seconds_before, self.segment_start = float(ckpt.get("train_seconds", 0.0)), time.perf_counter()
        # The global batch is fixed, so a step count means the same samples at any world size.
        self.step_in_epoch = ckpt["step_in_epoch"]
        rng = ckpt["rng"]
        if len(rng) == self.info.world_size or self.info.rank == 0:
            set_rng_state(rng[self.info.rank])
        else:                 # another world size: a fresh stream for this rank, a function of the step
            seed_everything(rank_seed(self.cfg.run.seed, self.info.rank, self.global_step))

    def checkpoint_now(self, due: bool) -> None:
        """At a step boundary: write last.pt if `due`, a signal arrived or run.checkpoint_minutes passed,
        then stop if a signal arrived. Every rank takes the same decision (one all-reduce under DDP)."""
        minutes = self.cfg.run.checkpoint_minutes
        timed = minutes > 0 and time.monotonic() - self.last_saved >= 60 * minutes
        stop, timed, due = max_over_ranks([self.stop_signal, int(timed), int(due)])
        if stop or timed or due:
            self.save("last.pt")
        if stop:
            raise Preempted(stop, self.global_step, self.run_dir / "checkpoints" / "last.pt")

    # ------------------------------------------------------------------ training
    def fit(self) -> dict:
        cfg = self.cfg
        total = cfg.optim.epochs * self.steps_per_epoch
        warmup = int(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.logger.start(self.global_step)
        self.segment_start = time.perf_counter()
        try:
            while self.epoch < cfg.optim.epochs:
                self.train_epoch(total, warmup)
                self.method.on_epoch_end(self.epoch)
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                if self.epoch % cfg.eval.every == 0 or self.epoch == cfg.optim.epochs:
                    self.validate()
                self.checkpoint_now(due=True)
            return self.finish(self.train_seconds())
        finally:
            self.logger.close()                     # also when stopped: the events so far are flushed

    def train_epoch(self, total: int, warmup: int) -> None:
        sampler = epoch_sampler(self.train_loader)
        sampler.set_epoch(self.epoch, skip=self.step_in_epoch * self.batch_per_rank)
        self.method.on_epoch_start(self.epoch)
        self.ddp_model.train()
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.cfg.optim.epochs}", leave=False,
                   disable=not (self.info.is_main and self.cfg.run.progress) or None)
        every = self.cfg.run.checkpoint_every
        for k, batch in enumerate(bar):
            self.skipped_images["train"] += int(batch.pop("skipped", 0))
            # Every image of the batch unreadable: skip the step. Under DDP every rank must take the same
            # steps and micro-batches, so all skip when one rank has fewer images than micro-batches.
            if min_over_ranks(batch["index"].numel()) < (self.cfg.optim.accumulate if self.info.enabled else 1):
                self.step_in_epoch += 1
                continue
            factor = lr_factor(self.global_step, total, warmup, self.cfg.optim.schedule)
            for g in self.optimizer.param_groups:
                g["lr"] = self.cfg.optim.lr * g["lr_scale"] * factor
            parts = self.train_step(batch)
            self.step_in_epoch += 1
            self.global_step += 1
            self.method.after_optimizer_step(self.model, self.global_step)
            self.logger.scalars("train", parts, self.global_step)
            self.logger.scalars("train", {"lr": self.cfg.optim.lr * factor}, self.global_step)
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
            if k + 1 < len(self.train_loader):          # the epoch's end has its own checkpoint, after validation
                self.checkpoint_now(due=bool(every) and self.global_step % every == 0)
        self.logger.scalars("data", {"skipped_images": sum(self.skipped_images.values())}, self.global_step)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimiser step on this rank's share of the global batch, in `optim.accumulate` micro-batches.

        Each micro-batch's loss is weighted by its share of the batch, so the accumulated gradient is
        that of the whole batch's mean loss; DDP all-reduces only in the last backward. Returns the
        loss parts, weighted the same way and averaged over ranks.
        """
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k != "skipped"}   # (B, ...) only
        n = len(batch["index"])
        micro = [m for m in zip(*(v.tensor_split(self.cfg.optim.accumulate) for v in batch.values())) if len(m[0])]
        keys = list(batch)
        self.optimizer.zero_grad(set_to_none=True)
        outs: list[tuple[float, dict[str, torch.Tensor]]] = []      # (weight, detached parts) per micro-batch
        for i, tensors in enumerate(micro):
            mb = dict(zip(keys, tensors))
            weight = len(mb["index"]) / n
            last = i == len(micro) - 1
            with self.ddp_model.no_sync() if self.info.enabled and not last else nullcontext():
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                    out = self.forward(mb)
                self.scaler.scale(out["loss"] * weight).backward()
            outs.append((weight, {k: v.detach() for k, v in out.items()}))
        # One device sync per step (not one per part and micro-batch), before the optimiser step.
        values = torch.stack([v.double().reshape(()) for _, o in outs for v in o.values()]).tolist()
        parts: dict[str, float] = {}
        for weight, o in outs:
            mb_values = dict(zip(o, values[: len(o)]))
            values = values[len(o):]
            if not math.isfinite(mb_values["loss"]):
                raise FloatingPointError(
                    f"non-finite loss {mb_values['loss']} at epoch {self.epoch + 1}, step {self.step_in_epoch + 1} "
                    f"(parts: {mb_values}); lower optim.lr or check the loss"
                )
            for k, v in mb_values.items():
                parts[k] = parts.get(k, 0.0) + weight * v
        self.method.sync_gradients()               # the method's own parameters are outside DDP
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        broadcast_buffers(self.model)
        return mean_over_ranks(parts)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            return self.method.training_step(batch, self.ddp_model)
        except RuntimeError as err:
            if "finished reduction in the prior iteration" not in str(err):
                raise
            raise RuntimeError(
                f"method '{self.cfg.method.name}' left some model parameters without a gradient in a step, "
                "which DDP only allows with model.find_unused_parameters = true (slower; a method can also set "
                "its class attribute find_unused_parameters = True)"
            ) from err

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str, model: nn.Module, thresholds: torch.Tensor | None = None) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Metrics, scores, targets and (annotated evaluation) the mask of annotated entries of a split."""
        stats: dict = {}
        scores, targets, observed = predict(model, self.eval_loaders[split], self.device, self.amp_dtype, stats, masked=True)
        self.skipped_images[split] += stats.get("skipped_images", 0)
        mask = observed if self.data.annotated(split) else None
        metrics = split_metrics(scores, targets, self.cfg.eval.threshold, thresholds, mask, self.cfg.eval.min_positives)
        if mask is None and (split == "test" or self.cfg.data.val_labels == "full"):   # group metrics need full labels
            metrics |= group_metrics(scores, targets, self.data.label_space, softmax_groups(model), self.cfg.eval.threshold)
        return metrics, scores, targets, mask

    def validate(self) -> None:
        record = {"epoch": self.epoch}
        for i, (name, model) in enumerate(self.method.models_to_evaluate(self.model).items()):
            metrics, *_ = self.evaluate("val", model)
            prefix = "val" if i == 0 else f"val_{name}"
            record.update({f"{prefix}/{k}": v for k, v in metrics.items()})
            self.logger.scalars(prefix, metrics, self.global_step)
        self.history.append(record)
        key = self.cfg.eval.select
        if key not in record:
            raise KeyError(f"eval.select '{key}' is not a validation metric; known: {', '.join(sorted(record))}")
        if record[key] > self.best:
            self.best, self.best_epoch = record[key], self.epoch
            self.save("best.pt")
        if self.on_validate is not None:
            self.on_validate(self.epoch, record)

    def finish(self, train_seconds: float) -> dict:
        """Reload the best checkpoint, calibrate thresholds on val, evaluate val and test on full labels."""
        barrier()
        best = self.run_dir / "checkpoints" / "best.pt"
        ckpt = None
        if broadcast_object(best.exists()):
            ckpt = read_checkpoint(best)
            self.model.load_state_dict(ckpt["model"])
            self.method.load_state_dict(ckpt["method"])
        names = self.data.label_space.names
        result: dict = {"metrics": {}, "per_class_ap": {}}
        for i, (name, model) in enumerate(self.method.models_to_evaluate(self.model).items()):
            suffix = "" if i == 0 else f"_{name}"
            val, val_scores, val_targets, val_mask = self.evaluate("val", model)
            thresholds = calibrate_thresholds(val_scores, val_targets, val_mask)
            test, test_scores, test_targets, test_mask = self.evaluate("test", model, thresholds)
            result["metrics"].update({f"val{suffix}/{k}": v for k, v in val.items()})
            result["metrics"].update({f"test{suffix}/{k}": v for k, v in test.items()})
            result["per_class_ap"][name] = per_class_ap(test_scores, test_targets, names, test_mask)
            if i == 0 and ckpt is not None and self.info.is_main:
                # best.pt (the file users copy) gains the calibrated thresholds, and the reported model's weights
                # when that is not the student (mlml.inference), rewritten atomically.
                ckpt["inference"] = self.inference_metadata(thresholds, None if model is self.model else model.state_dict())
                save_checkpoint(ckpt, best)
            if i == 0 and test_mask is not None:
                result["classes_few_positives"] = [names[c] for c in few_positive_classes(test_targets, test_mask, self.cfg.eval.min_positives)]
            if i == 0:
                self.logger.final(model, self.eval_loaders["test"], test_scores, test_targets, names, self.global_step, self.cfg.eval.image_grid)
        result.update(
            method=self.cfg.method_label(),
            setting=self.cfg.run.setting,
            experiment=self.cfg.run.experiment,
            seed=self.cfg.run.seed,
            best_epoch=self.best_epoch,
            epochs=self.cfg.optim.epochs,
            train_seconds=round(train_seconds, 2),
            provenance=environment(),
            train_images_per_second=round(self.steps_per_epoch * self.cfg.data.batch_size * self.cfg.optim.epochs / max(train_seconds, 1e-9), 1),
            classes_without_positives=[names[c] for c in classes_without_positives(test_targets)],
            eval_labels=self.data.eval_labels,
            history=self.history,
        )
        # What the numbers depend on: tables refuse to aggregate runs that differ in them.
        result.update(config=self.cfg.to_dict(), config_hash=config_hash(self.cfg), split_hash=split_hash(self.data.splits))
        result["data/skipped_images"] = sum(self.skipped_images.values())
        result["data/skipped_images_by_split"] = dict(self.skipped_images)
        self.logger.hparams(self.cfg, result["metrics"])
        if self.info.is_main:
            atomic_write_text(self.run_dir / "metrics.json", json.dumps(result, indent=2))
        return result


def train(cfg: Config, run_dir: Path | None = None, resume: bool = False, allow_config_change: bool = False,
          on_validate: Callable[[int, dict], None] | None = None) -> dict:
    """Train one run end to end and return its `metrics.json` content.

    `resume`: continue from `checkpoints/last.pt` (or `last.prev.pt` when `last.pt` is unreadable) if
    there is one, else start (so the same command can be repeated). A worker group that torchrun
    restarts (`--max-restarts`) always resumes. A checkpoint written by another config is refused,
    naming the differing keys, unless `allow_config_change`. Nothing is written to `run_dir` before
    the config and data are built, the run lock is taken and the checkpoint (if any) is checked.
    Raises `Preempted` after writing `last.pt` when SIGTERM or SIGUSR1 arrives.
    `on_validate(epoch, record)`: called on every rank after each validation with the epoch's
    history record (validation metrics); an exception it raises stops training (a search's pruning).
    """
    validate_config(cfg)                         # also for configs built in code, not loaded
    info = init_distributed(cfg.run.device, cfg.run.dist_timeout)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    run_dir = Path(run_dir) if run_dir else run_dir_for(cfg)
    trainer = Trainer(cfg, run_dir, info)                   # builds (and so validates) data, model, method
    trainer.on_validate = on_validate
    lock = FileLock(run_dir / "run.lock", what=f"run directory {run_dir}")
    on_rank_0(lambda: (run_dir.mkdir(parents=True, exist_ok=True), lock.acquire()))
    try:
        found = on_rank_0(find_resume_checkpoint, run_dir, resume or restart_count() > 0)
        if found is not None:
            path, ckpt = found
            check_resume_config(ckpt, cfg, path, allow_config_change)
            trainer.load(path, ckpt)
        with stop_on_signals(trainer):           # before config.toml: a signal once it exists stops cleanly
            if info.is_main:
                atomic_write_text(run_dir / "config.toml", to_toml(cfg.to_dict()))
            return trainer.fit()
    finally:
        lock.release()


def find_resume_checkpoint(run_dir: Path, resume: bool) -> tuple[Path, dict] | None:
    """The checkpoint to continue from and its content: last.pt, else last.prev.pt when last.pt is
    missing or unreadable; None for a new run.

    Refuses a directory that holds a run unless `resume`; reports each unusable file by name.
    """
    last = run_dir / "checkpoints" / "last.pt"
    candidates = [p for p in (last, previous_path(last)) if p.exists()]
    if not candidates and not (run_dir / "metrics.json").exists():
        return None
    if not resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose --out")
    problems = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            print(f"mlml: warning: {err}", file=sys.stderr)
            continue
        if problems:
            print(f"mlml: resuming from the previous checkpoint {path}", file=sys.stderr)
        return path, ckpt
    if problems:
        raise CheckpointError("no usable checkpoint to resume from: " + "; ".join(problems)
                              + f". Restore one, or delete {run_dir / 'checkpoints'} to train from the start")
    return None


def check_resume_config(ckpt: dict, cfg: Config, path: Path, allow_change: bool) -> None:
    """Refuse to continue a checkpoint under another config (naming the keys) unless `allow_change`."""
    differ = config_differences(upgrade_stored_config(ckpt["config"]), cfg.to_dict())
    if not differ:
        return
    if allow_change:
        print(f"mlml: warning: resuming {path} under a changed config: " + "; ".join(differ), file=sys.stderr)
        return
    raise ConfigChangedError(
        f"{path} was written by another config: " + "; ".join(differ)
        + ". Resume with the config the run was started with (a copy is in the run directory's config.toml), "
        "start a new run with another --out, or pass --allow-config-change to continue this state under the new config"
    )


class stop_on_signals:
    """While active, SIGTERM and SIGUSR1 ask `trainer` to stop after its current step (a second one kills).

    Only in the main thread (signal handlers cannot be set elsewhere); the previous handlers come back after.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.previous = trainer, {}

    def handle(self, signum: int, frame) -> None:
        if self.trainer.stop_signal:              # asked twice: stop now, as without the handler
            signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.trainer.stop_signal = signum

    def __enter__(self) -> stop_on_signals:
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
