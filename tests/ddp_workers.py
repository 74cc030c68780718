"""Multi-process helpers for tests/test_distributed.py (CPU, gloo), and a fault-injecting entry point.

`launch(fn, world_size, *args)` runs `fn(rank, *args)` in `world_size` spawned processes that have
joined one gloo process group (environment as torchrun sets it), with one thread each, and fails
after `timeout` seconds instead of hanging.

    torchrun --standalone --nproc-per-node=2 --max-restarts=1 -m tests.ddp_workers train ...

runs `mlml train ...`, except that in the first attempt (TORCHELASTIC_RESTART_COUNT=0) rank 1
dies (os._exit) before optimiser step MLML_TEST_DIE_AT_STEP + 1: a worker crash mid-epoch.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(THREADS, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, world_size: int, *args, timeout: float = 300.0) -> None:
    """Run `fn(rank, *args)` on `world_size` gloo ranks; re-raises a worker's error; kills all on timeout."""
    ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} on {world_size} processes did not finish in {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def save_rank_state(trainer, path: Path, init: dict) -> None:
    """Everything that must be identical across ranks: the model as built (before DDP broadcasts
    rank 0's), the model, method (and its teacher) and optimiser after training."""
    method = trainer.method
    state = {
        "init": init,
        "model": trainer.model.state_dict(),
        "method": method.state_dict(),
        "optimizer": trainer.optimizer.state_dict()["state"],
    }
    if method.teacher is not None:
        state["teacher"] = method.teacher.state_dict()
    torch.save(state, path)


def die_at_step(step: int) -> None:
    """Make this process exit abruptly (as a crash would) before optimiser step `step` + 1."""
    from mlml.trainer import Trainer

    original = Trainer.train_step

    def train_step(self, batch):
        if self.global_step == step:
            os._exit(17)
        return original(self, batch)

    Trainer.train_step = train_step


def main() -> int:
    from mlml.cli import main as mlml_main
    from mlml.distributed import restart_count

    if restart_count() == 0 and os.environ.get("RANK") == "1":
        die_at_step(int(os.environ["MLML_TEST_DIE_AT_STEP"]))
    return mlml_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------------------------------
# Scenarios: run on every rank by `launch`; results go to files the test process compares.
# ---------------------------------------------------------------------------------------------


def scenarios(rank: int, out: Path, overrides: list[str], stop_at: int, signals: list[tuple[int, int]]) -> None:
    """Everything tests/test_distributed.py checks on 2 ranks, in one launch (process start-up is the cost)."""
    collectives(rank, out)
    every_method(rank, out, overrides)
    unused_parameters(rank, out, overrides)
    unreadable_batch(rank, out, overrides)
    stopped_and_reference(rank, out, overrides, stop_at)
    preempted(rank, out, overrides, signals)


# Settings beyond each method's defaults whose state must also stay identical across ranks.
VARIANTS = {
    "mean_teacher_adaptive": ["method.teacher={class_adaptive = true, k = 2.0}"],
    "mean_teacher_semi": ["method.teacher={weight = 1.0}", "data.observation_args={labelled_fraction = 0.5}",
                          "data.unlabelled_ratio=1.0"],                       # mixed labelled/unlabelled batches
    # the domain branch's head lives in the method, outside DDP: its gradients must be averaged
    "supervised_domain_branch": ["data.observation=per_group", "method.domain_branch={weight = 0.5, schedule = 'constant'}"],
    "role_domain_branch": ["method.name=role", "data.observation=per_group", "method.domain_branch={weight = 0.5}"],
}


def collectives(rank: int, out: Path) -> None:
    from torch import nn

    from mlml.distributed import all_gather_cat, average_gradients, average_row_gradient, gather_rows

    sizes = all_gather_cat(torch.arange(rank + 1))                                 # ranks hold 1, 2 items
    flags = all_gather_cat(torch.tensor([[rank == 0, True]]))
    index = torch.tensor([3, 1]) if rank == 0 else torch.tensor([1, 5])
    rows = gather_rows(index, torch.full((2, 2), float(rank)))
    dense, sparse = nn.Parameter(torch.zeros(10, 3)), torch.zeros(10, 3)     # ROLE-like table gradient
    touched = torch.tensor([1, 4, 4, 7]) if rank == 0 else torch.tensor([0, 4, 9, 9])
    dense.grad = torch.zeros(10, 3).index_add_(0, touched, torch.randn(4, 3, generator=torch.Generator().manual_seed(rank)))
    sparse.copy_(dense.grad)
    average_gradients([dense])
    average_row_gradient(sparse, touched)
    torch.save({"sizes": sizes, "flags": flags, "rows": rows, "row_gradient": (dense.grad, sparse)},
               out / f"collectives.rank{rank}.pt")


def every_method(rank: int, out: Path, overrides: list[str]) -> None:
    """Two epochs of every registered method; the supervised run also evaluates, gathered."""
    import mlml.trainer
    from mlml.distributed import DistInfo
    from mlml.methods import METHODS
    from mlml.trainer import Trainer
    from tests.conftest import tiny_config

    built: dict = {}
    ddp = mlml.trainer.DistributedDataParallel

    def record_then_wrap(model, **kwargs):
        built["init"] = {k: v.clone() for k, v in model.state_dict().items()}
        return ddp(model, **kwargs)

    mlml.trainer.DistributedDataParallel = record_then_wrap
    info = DistInfo(rank, dist.get_world_size(), rank)
    runs = {name: [f"method.name={name}", *METHODS.get(name).requires] for name in METHODS.names()}
    runs.update(VARIANTS)
    for name, extra in runs.items():
        cfg = tiny_config(*overrides, *extra)
        trainer = Trainer(cfg, out / name, info)
        total = cfg.optim.epochs * trainer.steps_per_epoch
        for epoch in range(cfg.optim.epochs):
            trainer.train_epoch(total, warmup=0)
            trainer.method.on_epoch_end(epoch)
            trainer.epoch, trainer.step_in_epoch = epoch + 1, 0
        save_rank_state(trainer, out / f"{name}.rank{rank}.pt", built["init"])
        if name == "supervised":
            trainer.save("last.pt")
            evaluated = {split: trainer.evaluate(split, trainer.model) for split in ("val", "test")}
            torch.save(evaluated, out / f"eval.rank{rank}.pt")
    mlml.trainer.DistributedDataParallel = ddp


def unused_parameters(rank: int, out: Path, overrides: list[str]) -> None:
    """A method that leaves the head out of every other forward (as a domain branch used on some steps
    may): DDP fails with a clear error unless find_unused_parameters, and trains correctly with it."""
    from mlml.distributed import DistInfo
    from mlml.methods import METHODS
    from mlml.methods.supervised import Supervised
    from mlml.trainer import Trainer
    from tests.conftest import tiny_config

    class HeadOnOddCalls(Supervised):
        calls = 0

        def objective(self, outputs, batch):
            self.calls += 1
            out = outputs["image"]
            if self.calls % 2:
                return {"loss": self.loss(out["logits"].float(), batch["targets"], batch["observed"])}
            return {"loss": out["features"].float().pow(2).mean()}

    METHODS.register("head_on_odd_calls")(HeadOnOddCalls)                # in this process only
    info = DistInfo(rank, dist.get_world_size(), rank)
    results = {}
    for name, extra in {"without_flag": ["optim.accumulate=1"],
                        "with_flag": ["optim.accumulate=1", "model.find_unused_parameters=true"],
                        "with_flag_accumulate": ["model.find_unused_parameters=true"]}.items():
        cfg = tiny_config(*overrides, "method.name=head_on_odd_calls", *extra)
        trainer = Trainer(cfg, out / name, info)
        try:
            trainer.train_epoch(cfg.optim.epochs * trainer.steps_per_epoch, warmup=0)
            results[name] = {"model": trainer.model.state_dict()}
        except RuntimeError as err:
            results[name] = {"error": str(err)}
    torch.save(results, out / f"unused.rank{rank}.pt")


class EmptiedBatch:
    """A training loader whose batch `step` is empty on this rank (every image unreadable)."""

    def __init__(self, loader, step: int) -> None:
        self.loader, self.step = loader, step
        self.sampler, self.batch_sampler = loader.sampler, loader.batch_sampler

    def __iter__(self):
        for k, batch in enumerate(self.loader):
            if k == self.step:
                batch = {key: v if v.dim() == 0 else v[:0] for key, v in batch.items()}
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def unreadable_batch(rank: int, out: Path, overrides: list[str]) -> None:
    """Rank 1's second batch has no readable image: both ranks skip that step and stay identical."""
    from mlml.distributed import DistInfo
    from mlml.trainer import Trainer
    from tests.conftest import tiny_config

    trainer = Trainer(tiny_config(*overrides, "method.name=em_apl"), out / "unreadable", DistInfo(rank, dist.get_world_size(), rank))
    if rank == 1:
        trainer.train_loader = EmptiedBatch(trainer.train_loader, step=1)
    trainer.train_epoch(trainer.steps_per_epoch, warmup=0)
    torch.save({"global_step": trainer.global_step, "step_in_epoch": trainer.step_in_epoch,
                "model": trainer.model.state_dict(), "method": trainer.method.state_dict()}, out / f"unreadable.rank{rank}.pt")


def stopped_and_reference(rank: int, out: Path, overrides: list[str], stop_at: int) -> None:
    """An uninterrupted run, and the same run stopped (KeyboardInterrupt on every rank) after `stop_at` steps."""
    from mlml.trainer import Trainer, train
    from tests.conftest import tiny_config

    cfg = tiny_config(*overrides)
    train(cfg, out / "reference")
    original = Trainer.train_step

    def stop(self, batch):
        if self.global_step == stop_at:
            raise KeyboardInterrupt
        return original(self, batch)

    Trainer.train_step = stop
    try:
        train(cfg, out / "stopped")
    except KeyboardInterrupt:
        pass
    finally:
        Trainer.train_step = original


def preempted(rank: int, out: Path, overrides: list[str], signals: list[tuple[int, int]]) -> None:
    """SIGTERM to one rank (`signals`: (optimiser step, rank) pairs) during a step; every rank stops after
    that step, last.pt is written, and `train(resume=True)` continues, until the run is done. Also an
    uninterrupted reference run."""
    import signal

    from mlml.trainer import Preempted, Trainer, train
    from tests.conftest import tiny_config

    cfg = tiny_config(*overrides, "optim.epochs=4", "run.checkpoint_every=0")
    train(cfg, out / "preempt_reference")
    original, pending, seen = Trainer.train_step, list(signals), []

    def signalled(self, batch):
        if pending and self.global_step == pending[0][0]:
            if pending.pop(0)[1] == rank:
                signal.raise_signal(signal.SIGTERM)
        return original(self, batch)

    Trainer.train_step = signalled
    try:
        while True:
            try:
                train(cfg, out / "preempted", resume=True)
                break
            except Preempted as stop:
                seen.append(stop.step)
    finally:
        Trainer.train_step = original
    torch.save({"seen": seen}, out / f"preempted.rank{rank}.pt")
