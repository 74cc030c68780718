"""Launchers: where the runs of a table (and the workers of a search) execute.

`mlml reproduce TABLE` runs its runs as local subprocesses (`mlml.experiments.reproduce`);
`--launcher slurm` submits each run as one SLURM job through submitit instead:

    mlml reproduce single_positive --profile full --launcher slurm --slurm partition=gpu --slurm gpus_per_node=8

Each job runs the run's `mlml train ... --resume` command on its node(s): plainly for one process,
under `torchrun --standalone` for several GPUs on one node, and one torchrun per node with a c10d
rendezvous on the job's first node for several nodes. Its resources come from the table's
`[launcher.slurm]` section, then the profile's `[profiles.<p>.launcher.slurm]`, then `--slurm KEY=VALUE`
flags (`SlurmResources` lists the keys). Files of the job (sbatch script, pickles, logs) go to
`<run dir>/slurm/`, the job id to `<run dir>/slurm/job.json`.

Preemption and time limits: the job is a submitit checkpointable callable. On the time-limit signal
(SIGUSR2, `signal_delay_s` before the end) submitit calls `TrainJob.checkpoint`, which stops the
training process with SIGTERM (the trainer writes `last.pt`, then exits), and requeues the job; on
SIGTERM from SLURM (sent to a preempted job's processes) training stops the same way and the job
requeues itself through the same path, unless `sacct` says it was cancelled. The requeued job runs
the same command, and `--resume` continues from `checkpoints/last.pt` (an epoch end, or every
`checkpoint_every` steps). A run's state (`run_states`) is read from its directory (`metrics.json`:
done) and the scheduler (`sacct`): pending, running, done, failed (or, without a job: running while a
live process of this host holds its `run.lock`, as under a local `mlml reproduce --jobs N`; else
stopped when it has a checkpoint, missing when not).

submitit and optuna are the optional extra `mlml[cluster]`; `require` names it when they are missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from mlml.files import lock_owner       # no torch: job processes import this module too

# mlml.config (which imports torch) is imported where it is used: a job process that unpickles a
# `TrainJob` only starts the training command, which imports torch itself.

INSTALL_HINT = "pip install 'mlml[cluster]'"
# Seconds a job unknown to sacct counts as pending (just submitted) before it counts as lost.
UNKNOWN_GRACE_SECONDS = 300.0


def require(module: str, what: str) -> Any:
    """Import an optional dependency, or fail naming the extra that installs it."""
    import importlib

    from mlml.config import ConfigError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the '{module}' package, which is not installed: {INSTALL_HINT}") from None


# What stops local runs started by a parent process (`mlml reproduce --jobs`, `mlml search --workers`):
# kill and schedulers, Ctrl-C, the terminal closing (children of their own session would not get it).
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def relaying_stop_signals(stop: Callable[[int, Any], None]) -> Iterator[None]:
    """While active, `STOP_SIGNALS` call `stop(signum, frame)` instead of ending this process, so that
    it can stop its children cleanly (each with SIGTERM: the trainer writes last.pt) before it ends.

    Main thread only (elsewhere a no-op); a signal this process was started ignoring stays ignored
    (under `nohup` a closed terminal stops nothing); the previous handlers come back after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@dataclass
class SlurmResources:
    """What each SLURM job asks for (`[launcher.slurm]` in a table or search space, or `--slurm KEY=VALUE`)."""

    partition: str = ""           # "" = the cluster's default
    nodes: int = 1
    gpus_per_node: int = 0        # also the number of training processes per node (1 when 0: CPU)
    cpus_per_task: int = 0        # CPUs per node (one task per node); 0 = the cluster's default.
                                  # Sets run.threads = cpus_per_task / processes per node.
    mem_gb: float = 0.0           # memory per node; 0 = the cluster's default
    time_min: int = 24 * 60       # time limit of one job (a requeued job gets it again)
    account: str = ""
    job_name: str = "mlml"
    sbatch: dict = field(default_factory=dict)    # more #SBATCH options, e.g. {qos = "high", constraint = "a100"}
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load, source .venv/bin/activate)
    checkpoint_every: int = 0     # run.checkpoint_every of the jobs: a preempted run loses at most this many steps
    max_requeues: int = 3         # time-outs after which a job is not requeued again
    signal_delay_s: int = 120     # SIGUSR2 this long before the time limit: checkpoint and requeue

    @property
    def procs_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    @property
    def threads(self) -> int:
        """run.threads of each training process (0 = torch's default)."""
        return self.cpus_per_task // self.procs_per_node if self.cpus_per_task else 0

    def executor_parameters(self) -> dict:
        """submitit.SlurmExecutor parameters (sbatch options)."""
        params: dict[str, Any] = {"job_name": self.job_name, "nodes": self.nodes, "ntasks_per_node": 1,
                                  "time": self.time_min, "signal_delay_s": self.signal_delay_s}
        if self.partition:
            params["partition"] = self.partition
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
        if self.mem_gb:
            params["mem"] = f"{int(self.mem_gb * 1024)}MB"
        if self.account:
            params["account"] = self.account
        if self.setup:
            params["setup"] = list(self.setup)
        if self.sbatch:
            params["additional_parameters"] = dict(self.sbatch)
        return params


def slurm_resources(sections: list[dict], overrides: list[str] = (), where: str = "launcher.slurm") -> SlurmResources:
    """Resources from `[launcher.slurm]` sections (later ones win), then `KEY=VALUE` overrides."""
    from mlml.config import from_dict, merge, parse_override

    data: dict = {}
    for section in sections:
        data.update(section)
    for text in overrides:
        merge(data, *parse_override(text))
    return from_dict(SlurmResources, data, f"{where}.")


def launcher_section(spec: dict, *path: str) -> dict:
    """spec[path...]['launcher']['slurm'] or {} (a table's or a profile's SLURM resources)."""
    node = spec
    for key in path:
        node = node.get(key, {})
    from mlml.config import ConfigError

    section = node.get("launcher", {})
    unknown = sorted(set(section) - {"slurm"})
    if unknown:
        raise ConfigError(f"unknown launcher '{unknown[0]}' in {'.'.join((*path, 'launcher'))}; known: slurm")
    return section.get("slurm", {})


# ---------------------------------------------------------------------------------- the job
def node_command(train_args: list[str], nodes: int, procs: int, job_id: str = "", head: str = "") -> list[str]:
    """The command each node runs: `python -m mlml train ...`, under torchrun for several processes."""
    if nodes == 1 and procs == 1:
        return [sys.executable, "-m", "mlml", *train_args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}"]
    if nodes == 1:
        return [*torchrun, "--standalone", "-m", "mlml", *train_args]
    port = 29500 + int(job_id.split("_")[0] or 0) % 1000     # two jobs sharing a node use two ports
    return [*torchrun, f"--nnodes={nodes}", f"--rdzv-id={job_id}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={head}:{port}", "-m", "mlml", *train_args]


class TrainJob:
    """One run as a submitit job: runs `mlml train ... --resume` on its node; checkpointable.

    submitit calls `checkpoint` on SIGUSR2 (time limit, or preemption where the cluster sends it):
    the training process gets SIGTERM, on which the trainer writes `last.pt` after its current step
    and exits, and the job is requeued with a fresh `TrainJob`. A SIGTERM from SLURM (every process
    of a preempted job gets it) stops training the same way; the job then takes the same path.
    `--resume` makes the requeued job continue from `checkpoints/last.pt`.
    """

    def __init__(self, train_args: list[str], nodes: int = 1, procs: int = 1) -> None:
        self.train_args, self.nodes, self.procs = list(train_args), nodes, procs
        self.process: subprocess.Popen | None = None
        self.terminated = False

    def __call__(self) -> None:
        submitit = require("submitit", "the SLURM launcher")
        env = submitit.JobEnvironment()
        self.terminated = False
        signal.signal(signal.SIGTERM, self._on_sigterm)    # submitit ignores it; remember it
        cmd = node_command(self.train_args, self.nodes, self.procs, env.job_id, env.hostnames[0])
        print(f"mlml job {env.job_id} on {env.hostname}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        # The training process ignores SIGUSR2 (SLURM sends it to every process of the job before the
        # time limit): submitit's handler here stops it with SIGTERM, on which it writes last.pt.
        self.process = subprocess.Popen(cmd, preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
        code = self.process.wait()
        if code != 0 and self.terminated:
            requeue_preempted(f"training stopped by SIGTERM (exit {code})")
            return
        if code != 0:
            raise RuntimeError(f"mlml train exited with status {code}: {' '.join(cmd)}")

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.terminated = True

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Stop the training process (its last.pt stays) and return the job to requeue."""
        submitit = require("submitit", "the SLURM launcher")
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return submitit.helpers.DelayedSubmission(TrainJob(self.train_args, self.nodes, self.procs))

    def __getstate__(self) -> dict:
        return {"train_args": self.train_args, "nodes": self.nodes, "procs": self.procs}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def requeue_after_sigterm(state: str) -> bool:
    """Whether a job whose training died of SIGTERM requeues itself, from its SLURM state: not when
    the user cancelled it (CANCELLED), nor when SLURM requeues it itself (REQUEUED, PENDING)."""
    return state not in {"CANCELLED", "REQUEUED", "PENDING", "REQUEUE_HOLD", "COMPLETED", "FAILED"}


def requeue_preempted(what: str) -> None:
    """Inside a job stopped by SIGTERM: requeue it through submitit's preemption path (checkpoint,
    `scontrol requeue`, exit) unless it was cancelled or SLURM requeues it itself."""
    submitit = require("submitit", "the SLURM launcher")
    env = submitit.JobEnvironment()
    state = job_state(env.job_id) if env.cluster == "slurm" else "RUNNING"
    if not requeue_after_sigterm(state):
        raise RuntimeError(f"{what} with the job {state}: not requeued here")
    print(f"{what}, job {state}: preempted, requeueing", file=sys.stderr, flush=True)
    signal.raise_signal(env._usr_sig())


def job_state(job_id: str) -> str:
    try:
        return sacct_states([job_id]).get(job_id, "UNKNOWN")
    except RuntimeError:
        return "UNKNOWN"


# ---------------------------------------------------------------------------------- states
class RunState(NamedTuple):
    state: str          # done | running | pending | failed | missing | stopped
    job: str = ""       # "slurm 1234"; "pid 123" for a run a process of this host trains; else "" or the lock's owner
    log: str = ""       # last lines of the job's log (failed runs)


PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED", "RESV_DEL_HOLD"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


def job_file(run_dir: Path) -> Path:
    return run_dir / "slurm" / "job.json"


def log_tail(folder: Path, job_id: str, lines: int = 6) -> str:
    """The last lines of a job's stderr log (where a failed run's traceback is)."""
    for name in (f"{job_id}_0_log.err", f"{job_id}_0_log.out"):
        path = folder / name
        if path.exists():
            text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if text:
                return "\n".join(text[-lines:])
    return ""


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """job id -> SLURM state from one `sacct` call (steps such as 123.batch are left out)."""
    if not job_ids:
        return {}
    cmd = ["sacct", "-o", "JobID,State", "--parsable2", "--noheader"]
    for job_id in job_ids:
        cmd += ["-j", job_id]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"cannot read job states with `{' '.join(cmd)}`: {err}") from None
    states = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) >= 2 and "." not in parts[0]:
            states[parts[0]] = parts[1].split()[0] if parts[1].strip() else "UNKNOWN"
    return states


def slurm_state(scheduler: str, submitted: float) -> str:
    if scheduler in PENDING:
        return "pending"
    if scheduler in RUNNING:
        return "running"
    if scheduler == "UNKNOWN" and time.time() - submitted < UNKNOWN_GRACE_SECONDS:
        return "pending"
    return "failed"        # COMPLETED without metrics.json, FAILED, CANCELLED, TIMEOUT, PREEMPTED, ...


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def run_finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").exists()


def run_states(dirs: list[Path], done: Callable[[Path], bool] = run_finished) -> dict[Path, RunState]:
    """Each run's state, from its directory (`done`: its metrics.json exists) and, for a submitted
    job, the scheduler."""
    jobs = {d: json.loads(job_file(d).read_text()) for d in dirs if job_file(d).exists()}
    pending_slurm = [j["job_id"] for d, j in jobs.items() if j["cluster"] == "slurm" and not done(d)]
    scheduler = sacct_states(pending_slurm)
    out = {}
    for d in dirs:
        job = jobs.get(d)
        if done(d):
            out[d] = RunState("done", f"{job['cluster']} {job['job_id']}" if job else "")
        elif job is None:               # never submitted: started by hand or by a local `reproduce`, or not at all
            owner = lock_owner(d / "run.lock")      # the trainer's lock: a live owner is training it now
            if owner and owner[1] == socket.gethostname():
                out[d] = RunState("running", f"pid {owner[0]}")
            else:                       # "stopped": a checkpoint but no process here. Another host's lock
                # cannot be checked (a node that died keeps it): shown, but not waited for, so that a
                # launcher resubmits the run and its job names the lock to delete, as `mlml train` would.
                held = f"locked by pid {owner[0]} on {owner[1]}" if owner else ""
                out[d] = RunState("stopped" if (d / "checkpoints" / "last.pt").exists() else "missing", held)
        else:
            if job["cluster"] == "slurm":
                state = slurm_state(scheduler.get(job["job_id"], "UNKNOWN"), job["submitted"])
            else:      # submitit's local executor: the job id is the process id
                state = "running" if process_alive(int(job["job_id"])) else "failed"
            log = log_tail(job_file(d).parent, job["job_id"]) if state == "failed" else ""
            out[d] = RunState(state, f"{job['cluster']} {job['job_id']}", log)
    return out


# ---------------------------------------------------------------------------------- the launcher
class SlurmLauncher:
    """Submits runs as SLURM jobs through submitit; waits for them unless `wait` is False.

    `cluster = "local"` uses submitit's local executor instead (the same jobs as local processes:
    how the tests exercise this path without a cluster).
    """

    def __init__(self, resources: SlurmResources, wait: bool = True, poll: float = 30.0, cluster: str = "slurm") -> None:
        from mlml.config import ConfigError

        if cluster not in ("slurm", "local"):
            raise ConfigError(f"unknown submitit cluster '{cluster}'; known: slurm, local")
        self.resources, self.wait, self.poll, self.cluster = resources, wait, poll, cluster
        self.submitit = require("submitit", "--launcher slurm")
        if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
            raise ConfigError("--launcher slurm needs SLURM's sbatch and srun on PATH (run it on the cluster's login node)")
        self.jobs: list[Any] = []      # this invocation's submitit jobs

    @property
    def threads(self) -> int:
        return self.resources.threads

    def executor(self, folder: Path) -> Any:
        if self.cluster == "local":
            ex = self.submitit.LocalExecutor(folder, max_num_timeout=self.resources.max_requeues)
            ex.update_parameters(timeout_min=self.resources.time_min)
            return ex
        ex = self.submitit.SlurmExecutor(folder, max_num_timeout=self.resources.max_requeues)
        ex.update_parameters(**self.resources.executor_parameters())
        return ex

    def submit(self, run_dir: Path, fn: Callable[[], Any]) -> str:
        """Submit `fn` as one job whose files live in `<run_dir>/slurm/`; returns the job id."""
        folder = run_dir / "slurm"
        folder.mkdir(parents=True, exist_ok=True)
        job = self.executor(folder).submit(fn)
        self.jobs.append(job)
        record = json.loads(job_file(run_dir).read_text()) if job_file(run_dir).exists() else {"history": []}
        record.update(cluster=self.cluster, job_id=str(job.job_id), submitted=time.time())
        record["history"].append(str(job.job_id))
        job_file(run_dir).write_text(json.dumps(record, indent=2) + "\n")
        return str(job.job_id)

    def train_job(self, train_args: list[str]) -> TrainJob:
        args = [*train_args, "--set", f"run.checkpoint_every={self.resources.checkpoint_every}"]
        return TrainJob(args, self.resources.nodes, self.resources.procs_per_node)

    def run(self, todo: dict[Path, list[str]]) -> bool:
        """Submit every run of `todo` (run dir -> `mlml train` arguments) that has no pending or
        running job; wait for all unless `wait` is False. Returns whether they are finished; raises
        naming the failed runs (with their logs' last lines)."""
        states = run_states(list(todo))
        submitted = 0
        for d, args in todo.items():
            if states[d].state in ("missing", "stopped", "failed"):
                job_id = self.submit(d, self.train_job(args))
                print(f"  submitted {d} as {self.cluster} job {job_id}" + (" (resubmitted: it had failed)" if states[d].state == "failed" else ""), file=sys.stderr)
                submitted += 1
        print(f"  {submitted} jobs submitted, {len(todo) - submitted} already queued or running", file=sys.stderr)
        if not self.wait:
            return False
        final = self.wait_for(list(todo))
        failed = {d: s for d, s in final.items() if s.state != "done"}
        if failed:
            shown = "\n".join(f"{d} ({s.job}): {s.state}\n{s.log}" for d, s in failed.items())
            raise RuntimeError(f"{len(failed)} of {len(todo)} runs did not finish; running the same command again "
                               f"resubmits them (they resume from checkpoints/last.pt):\n{shown}")
        return True

    def wait_for(self, dirs: list[Path], done: Callable[[Path], bool] = run_finished) -> dict[Path, RunState]:
        """Poll the runs' states every `poll` seconds until none is pending or running."""
        last = None
        while True:
            for job in self.jobs:
                job.done()             # a local executor's job: reaps its process once it ended
            states = run_states(dirs, done)
            counts = {k: sum(s.state == k for s in states.values()) for k in ("pending", "running", "done", "failed")}
            if counts != last:
                print("  " + ", ".join(f"{v} {k}" for k, v in counts.items()), file=sys.stderr, flush=True)
                last = counts
            if counts["pending"] == 0 and counts["running"] == 0:
                return states
            time.sleep(self.poll)
