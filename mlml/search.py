"""Hyper-parameter search on validation metrics with Optuna: `mlml search CONFIG --space SPACE.toml --trials N`.

Every trial trains the config with the space's sampled values (`mlml.trainer.train`), reports the
validation metric after each evaluation and is pruned when it falls behind (median rule, or
successive halving); its value is the validation metric of its best checkpoint. Test metrics are
never read. The study lives in a database (`--storage`: SQLite in the output folder by default;
any URL Optuna's RDB storage takes, e.g. PostgreSQL, so that many SLURM jobs share one study),
worked on by `--workers K` local processes or, with `--launcher slurm`, K SLURM jobs. The result:
`<out>/trials.md` (every trial: state, value, epochs, parameters) and `<out>/best.toml`, the best
trial's full config, which `mlml train --config` takes.

A space file:

    [params]
    "optim.lr" = {low = 1e-4, high = 1e-2, log = true}     # float; ints when low and high are ints
    "optim.weight_decay" = {low = 0.0, high = 1e-3}
    "model.width" = {low = 16, high = 48, step = 8}
    "method.loss" = ["an", "an_ls", "masked_bce"]          # a choice
    [[enqueue]]                                            # trials run first (e.g. the current recipe)
    "optim.lr" = 2e-3
    [launcher.slurm]                                       # resources of each worker job (`--launcher slurm`)
    gpus_per_node = 1
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import sys
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mlml.config import ConfigError, load_config, to_toml
from mlml.launchers import relaying_stop_signals, require

FINISHED = ("COMPLETE", "PRUNED")


@dataclass
class Param:
    name: str                      # dotted config key
    choices: list = field(default_factory=list)
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    def suggest(self, trial: Any) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, self.choices)
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def example(self) -> Any:
        return self.choices[0] if self.choices else self.low


def read_space(path: Path) -> dict:
    """{"params": [Param], "enqueue": [dict], "launcher": {...}} from a space file; errors name the key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"search space file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from None
    unknown = sorted(set(data) - {"params", "enqueue", "launcher"})
    if unknown or not data.get("params"):
        raise ConfigError(f"{path}: " + (f"unknown key '{unknown[0]}'" if unknown else "no [params]") + "; known: params, enqueue, launcher")
    params = []
    for name, spec in data["params"].items():
        if isinstance(spec, list) and spec:
            params.append(Param(name, choices=spec))
        elif isinstance(spec, dict) and {"low", "high"} <= set(spec) <= {"low", "high", "log", "step"}:
            params.append(Param(name, **spec))
        else:
            raise ConfigError(f"{path}: params.'{name}' must be a list of choices or {{low, high[, log, step]}}, got {spec!r}")
    names = {p.name for p in params}
    for i, trial in enumerate(data.get("enqueue", [])):
        if set(trial) - names:
            raise ConfigError(f"{path}: enqueue[{i}] sets '{sorted(set(trial) - names)[0]}', which is not in [params]")
    return {"params": params, "enqueue": data.get("enqueue", []), "launcher": data.get("launcher", {})}


def override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"          # JSON scalars are TOML scalars


@dataclass
class SearchSpec:
    """Everything a worker needs (picklable: workers are spawned processes or SLURM jobs)."""

    config: str
    overrides: list[str]
    space: str
    storage: str
    study: str
    out: str
    metric: str = "val/mAP_macro"
    pruner: str = "median"         # median | halving | none
    startup_trials: int = 5        # trials that complete before the median rule prunes and TPE models
    seed: int = 0
    threads: int = 0               # run.threads of each trial (0 = torch's default)


def trial_config(spec: SearchSpec, params: dict, number: int | None = None) -> Any:
    extra = [override(k, v) for k, v in params.items()]
    if number is not None:
        extra += [f"run.experiment=search", f"run.setting={spec.study}", f"run.method_label=trial{number}",
                  f"run.out_dir={spec.out}", f"run.threads={spec.threads}", "run.progress=false"]
    return load_config(spec.config, [*spec.overrides, *extra])


def check(spec: SearchSpec) -> dict:
    """Fail before any trial: the metric is a validation one, every parameter is a config key."""
    if not spec.metric.startswith("val"):
        raise ConfigError(f"--metric {spec.metric}: a search selects on validation metrics only (val/...)")
    if spec.pruner not in ("median", "halving", "none"):
        raise ConfigError(f"--pruner {spec.pruner}: known: median, halving, none")
    space = read_space(Path(spec.space))
    trial_config(spec, {p.name: p.example() for p in space["params"]})
    return space


def storage(url: str) -> Any:
    """Optuna RDB storage: waits on a locked SQLite file; a dead worker's trial is failed by heartbeat.

    SQLite ignores Optuna's `SELECT ... FOR UPDATE`, so two workers could both number a new trial N
    or both move one enqueued trial to RUNNING (and train it into the same `trialN` folder). On a
    SQLite file those two steps are taken one worker at a time under an OS lock on `<database>.claim`
    (released by the kernel when a worker dies; on platforms without `fcntl` they are not serialised).
    Server databases (PostgreSQL, MySQL) lock the rows themselves.
    """
    import warnings

    optuna = require("optuna", "mlml search")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)   # heartbeat_interval
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    database = url.removeprefix("sqlite:///").split("?")[0]
    on_file = database != url and database not in ("", ":memory:")
    cls = sqlite_storage(optuna, Path(database + ".claim")) if on_file else optuna.storages.RDBStorage
    return cls(url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=120)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an OS lock on `path` (blocking; released when the block ends or the process dies)."""
    try:
        import fcntl
    except ImportError:                 # Windows: no fcntl; claims are not serialised
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_storage(optuna: Any, lock: Path) -> type:
    """Optuna's RDB storage whose trial numbering and claiming of waiting trials hold `lock`."""

    class SQLiteStorage(optuna.storages.RDBStorage):
        def create_new_trial(self, study_id: int, template_trial: Any = None) -> int:
            with exclusive(lock):
                return super().create_new_trial(study_id, template_trial)

        def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
            if state.name != "RUNNING":
                return super().set_trial_state_values(trial_id, state, values)
            with exclusive(lock):
                return super().set_trial_state_values(trial_id, state, values)

    return SQLiteStorage


def open_study(spec: SearchSpec, seed_offset: int = 0) -> Any:
    optuna = require("optuna", "mlml search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=spec.seed + seed_offset, n_startup_trials=spec.startup_trials, constant_liar=True)
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials),
              "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
              "none": lambda: optuna.pruners.NopPruner()}[spec.pruner]()
    return optuna.create_study(study_name=spec.study, storage=storage(spec.storage), sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


def counted(trial: Any) -> bool:
    """A trial that used up a worker's quota: finished, or failed by its own error (not a dead worker's)."""
    return trial.state.name in FINISHED or (trial.state.name == "FAIL" and "error" in trial.user_attrs)


def objective(spec: SearchSpec, params: list[Param], worker: str) -> Any:
    optuna = require("optuna", "mlml search")
    from mlml.trainer import Preempted, train

    def run(trial: Any) -> float:
        values = {p.name: p.suggest(trial) for p in params}
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("pid", os.getpid())
        cfg = trial_config(spec, values, trial.number)
        epochs: list[int] = []

        def report(epoch: int, record: dict) -> None:
            epochs.append(epoch)
            trial.set_user_attr("epochs", epoch)
            trial.report(record[spec.metric], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}: {spec.metric} = {record[spec.metric]:.4f}")

        start = time.perf_counter()
        try:
            result = train(cfg, Path(spec.out) / f"trial{trial.number}", on_validate=report)
        except optuna.TrialPruned:
            raise
        except Preempted as err:        # the worker stops (see `work`); its trial fails, uncounted
            stopped.append(err)
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:500])
            raise
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
        return result["metrics"][spec.metric]

    stopped: list[Exception] = []
    run.stopped = stopped
    return run


def work(spec: SearchSpec, quota: int, worker: str, seed_offset: int = 0) -> int:
    """Run trials until `quota` of them, started by `worker`, are counted; returns how many ran here.

    The count is read from the study, so a worker restarted under the same name (a requeued SLURM
    job) continues its share instead of starting over.
    """
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    study = open_study(spec, seed_offset)
    params = read_space(Path(spec.space))["params"]
    run = objective(spec, params, worker)
    ran = 0
    while sum(counted(t) and t.user_attrs.get("worker") == worker for t in study.get_trials(deepcopy=False)) < quota:
        study.optimize(run, n_trials=1, catch=(Exception,), gc_after_trial=True)
        if run.stopped:                 # SIGTERM (preemption): stop here, the trial's state is lost
            raise run.stopped[0]
        ran += 1
    return ran


class SearchStopped(Exception):
    """Local search workers stopped by a signal; their trials in progress failed, uncounted."""


def run_workers(spec: SearchSpec, shares: list[int], tag: str) -> None:
    """`len(shares)` local worker processes; a stop signal to this one (SIGTERM, Ctrl-C, SIGHUP:
    `mlml.launchers.relaying_stop_signals`) is relayed to each as SIGTERM, on which its trial in
    progress stops after its step, and `SearchStopped` is raised once all have ended. (Without the
    relay the workers outlived a stopped search, training on unseen.)"""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_work_in_process, args=(spec, q, f"{tag}-{i}", i)) for i, q in enumerate(shares)]
    stopped: list[int] = []

    def stop(signum: int, frame: Any = None) -> None:
        stopped.append(signum)
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                p.terminate()                   # SIGTERM

    with relaying_stop_signals(stop):
        for p in procs:
            if not stopped:
                p.start()
        for p in procs:
            if p.pid is not None:
                p.join()
    if stopped:
        raise SearchStopped(f"stopped by {signal.Signals(stopped[0]).name}: the workers' trials in progress failed, "
                            "uncounted; the same command continues the study")
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(procs)} search workers failed (exit codes {failed})")


def _work_in_process(spec: SearchSpec, quota: int, worker: str, seed_offset: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C reaches the parent, which relays SIGTERM
    work(spec, quota, worker, seed_offset)


class SearchWorker:
    """A worker as a submitit job; requeued on time limit or preemption, it continues its quota."""

    def __init__(self, spec: SearchSpec, quota: int, worker: str, seed_offset: int, done: str) -> None:
        self.spec, self.quota, self.worker, self.seed_offset, self.done = spec, quota, worker, seed_offset, done

    def __call__(self) -> int:
        from mlml.launchers import requeue_preempted
        from mlml.trainer import Preempted

        try:
            ran = work(self.spec, self.quota, self.worker, self.seed_offset)
        except Preempted as err:
            requeue_preempted(f"search worker {self.worker}: {err}")
            return 0
        Path(self.done).write_text(f"{ran}\n")
        return ran

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        submitit = require("submitit", "mlml search --launcher slurm")
        return submitit.helpers.DelayedSubmission(SearchWorker(self.spec, self.quota, self.worker, self.seed_offset, self.done))


def quotas(n: int, workers: int) -> list[int]:
    return [n // workers + (i < n % workers) for i in range(workers) if n // workers + (i < n % workers) > 0]


def search(spec: SearchSpec, trials: int, workers: int = 1, launcher: Any = None) -> str:
    """Bring the study to `trials` counted trials, then write and return the trials table and `best.toml`.

    `workers` local processes (one runs here when 1), or SLURM jobs through `launcher`
    (`mlml.launchers.SlurmLauncher`); with a launcher that does not wait, return after submitting.
    """
    space = check(spec)
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    study = open_study(spec)
    known = {json.dumps(t.params, sort_keys=True) for t in study.get_trials(deepcopy=False)}
    for params in space["enqueue"]:
        if json.dumps(params, sort_keys=True) not in known:
            study.enqueue_trial(params)
    remaining = max(0, trials - sum(counted(t) for t in study.get_trials(deepcopy=False)))
    shares = quotas(remaining, max(1, workers))
    tag = uuid.uuid4().hex[:6]
    print(f"study '{spec.study}' in {spec.storage}: {remaining} trials to run over {len(shares)} workers", file=sys.stderr)
    if launcher is not None and shares:
        dirs = {Path(spec.out) / "workers" / f"{tag}-{i}": q for i, q in enumerate(shares)}
        for i, (d, q) in enumerate(dirs.items()):
            launcher.submit(d, SearchWorker(spec, q, f"{tag}-{i}", i, str(d / "done")))
        if not launcher.wait:
            return f"{len(dirs)} worker jobs submitted; this command again writes the table once their trials are done"
        states = launcher.wait_for(list(dirs), done=lambda d: (d / "done").exists())
        for d, state in states.items():
            if state.state != "done":
                print(f"search worker {d.name} ({state.job}) {state.state}:\n{state.log}", file=sys.stderr)
    elif len(shares) == 1:
        work(spec, shares[0], f"{tag}-0")
    elif shares:
        run_workers(spec, shares, tag)
    return write_results(spec, open_study(spec), space["params"])


def write_results(spec: SearchSpec, study: Any, params: list[Param]) -> str:
    """`<out>/trials.md` (every trial) and `<out>/best.toml` (the best trial's config); returns the table."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    lines = [f"# Search '{spec.study}': {spec.metric} (validation)", "",
             f"Config: `{spec.config}`" + "".join(f" `--set {o}`" for o in spec.overrides) + f"; space: `{spec.space}`  ",
             f"Storage: `{spec.storage}`; TPE sampler, {spec.pruner} pruning; "
             + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v) + "  "]
    best_path = Path(spec.out) / "best.toml"
    if complete:
        best = max(complete, key=lambda t: t.value)
        cfg = trial_config(spec, best.params)
        best_path.write_text(f"# mlml search '{spec.study}': trial {best.number}, {spec.metric} = {best.value:.4f}\n"
                             + to_toml(cfg.to_dict()))
        lines.append(f"Best: trial {best.number}, {spec.metric} = {best.value:.4f}; its config: `{best_path}`")
    header = ["trial", "state", spec.metric, "epochs", *[p.name for p in params], "seconds", "worker"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in trials:
        value = f"{t.value:.4f}" if t.value is not None else (t.user_attrs.get("error", "–")[:60] if t.state.name == "FAIL" else "–")
        cells = [str(t.number), t.state.name.lower(), value, str(t.user_attrs.get("epochs", "–")),
                 *[format_value(t.params.get(p.name, "–")) for p in params],
                 str(t.user_attrs.get("seconds", "–")), str(t.user_attrs.get("worker", "–"))]
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (Path(spec.out) / "trials.md").write_text(md)
    return md


def format_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
