"""Tables as experiments: expand a table's settings x methods x seeds, run what is missing, and
build Markdown/CSV tables from the runs' `metrics.json` files (never from logs).

A table is a TOML file in `experiments/tables/`:

    title = "..."
    metrics = ["test/mAP_macro", "test/f1_macro_calibrated"]
    addons = ["method.teacher"]         # optional (before any [section]): add-ons compared with the best row without them
    [baselines]                         # optional: rows of other tables (their results/<table>.runs.csv) that join
    single_positive = ["single_positive"]   # the "without" pool of this setting ("<table>" or "<table>/<setting>")
    [profiles.quick]                    # and [profiles.full]
    config = "../configs/quick.toml"    # relative to the table file
    seeds = 3
    cost = "about 6 min on 2 CPU cores"   # shown by --list until a reproduction was measured
    [settings]                          # setting name -> config overrides
    single_positive = ["data.observation=single_positive"]
    [methods]                           # method name -> config overrides
    an = ["method.loss=an"]

A profile on another data track (the real-image track, `experiments/configs/real.toml`) names it:

    [profiles.real]
    config = "../configs/real.toml"
    track = "real"                      # results/<table>.real.md, runs under <runs_dir>/real/
    title = "..."                       # the table's title on this track (default: the table's)
    [profiles.real.settings]            # entries replace the table's of the same name on this track;
    shortcut = ["data.mnist5k.nuisance=collection"]   # false leaves one out (`profile_spec`)
    [profiles.real.methods]
    role = ["method.name=role", "method.args={k = 2.0}"]

A table (before any [section]) or a profile may leave cells of the grid out, "<setting>/<method>"
(a profile's list adds to the table's); a left-out cell shows "–":

    skip = ["one_percent/mean_teacher_em_r7"]

`reproduce` writes `results/<table>.md` and `.csv` (`<table>.<track>.*` for a track's profile), and `results/<table>.timing.json` with the
measured cost of each profile (summed `train_seconds` of the runs, wall time of the last complete
reproduction, hardware) that `mlml reproduce --list` shows. It also writes a TensorBoard
custom-scalars layout at `runs/<table>/` (one chart per metric comparing every run).

Beside the metrics, a table shows each row's convergence (best epoch, the slope of validation
`eval.select` over the last epochs, a flag on rows still improving; per run in `<table>.runs.csv`)
and, for add-ons (`method.teacher`, `method.domain_branch`), the best row with the add-on against
the best row without it, both chosen on validation (docs/design.md, "Tables").

Tables only aggregate comparable runs (`check_comparable`): the seeds of one cell must share
their config (but the seed) and their splits (`split_hash` in metrics.json), and the runs of a
table may differ only in the keys the table varies; otherwise the error names the keys that differ.
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import hashlib
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mlml.config import (EXECUTION_KEYS, Config, ConfigError, config_diff, flat, from_dict, load_config, parse_override,
                         read_toml_with_bases, run_dir_for)
from mlml.files import FileLock, LockedError
from mlml.launchers import SlurmLauncher, SlurmResources, launcher_section, relaying_stop_signals, run_states, slurm_resources
from mlml.settings import upgrade_stored_config
from mlml.tensorboard import write_table_layout

TABLES_DIR = Path(__file__).resolve().parent.parent / "experiments" / "tables"


@dataclass(frozen=True)
class Run:
    setting: str
    method: str
    seed: int
    config: Path
    overrides: tuple[str, ...]


def table_file(name: str) -> Path:
    path = Path(name) if name.endswith(".toml") else TABLES_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TABLES_DIR.glob("*.toml")))
        raise ConfigError(f"unknown table '{name}'; known: {known}")
    return path


def read_table(name: str) -> dict:
    path = table_file(name)
    with open(path, "rb") as f:
        spec = tomllib.load(f)
    spec["name"], spec["path"] = path.stem, path
    for key in ("title", "metrics", "profiles", "settings", "methods"):
        if key not in spec:
            raise ConfigError(f"{path}: missing key '{key}'")
    check_addons(spec)
    skipped_cells(spec, spec.get("skip", []), "skip")
    return spec


def profile_spec(spec: dict, profile: str) -> dict:
    """The table as `profile` runs it: its track's title, settings and methods, and results name.

    A profile's `settings` / `methods` tables replace the table's entries of the same name (an
    entry `false` leaves it out); a name the table does not have is an error (a typo would
    otherwise add a row). `results` is `<table>` or, for a profile with a `track`, `<table>.<track>`.
    """
    if profile not in spec["profiles"]:
        raise ConfigError(f"table '{spec['name']}' has no profile '{profile}'; known: {', '.join(spec['profiles'])}")
    prof = spec["profiles"][profile]
    out = {**spec, "title": prof.get("title", spec["title"])}
    for group in ("settings", "methods"):
        own = prof.get(group, {})
        unknown = sorted(set(own) - set(spec[group]))
        if unknown:
            raise ConfigError(f"{spec['path']}: profiles.{profile}.{group}.{unknown[0]}: the table has no such entry; "
                              f"known: {', '.join(spec[group])}")
        merged = {name: own.get(name, entry) for name, entry in spec[group].items()}
        out[group] = {name: entry for name, entry in merged.items() if entry is not False}
    out["skipped"] = skipped_cells(spec, [*spec.get("skip", []), *prof.get("skip", [])], f"profiles.{profile}.skip")
    track = prof.get("track", "")
    if not isinstance(track, str) or track in (".", "..") or any(c in track for c in "/\\"):
        raise ConfigError(f"{spec['path']}: profiles.{profile}.track = {track!r} must be a name without '/'")
    out["results"] = f"{spec['name']}.{track}" if track else spec["name"]
    out["track"] = track
    return out


def skipped_cells(spec: dict, entries: object, where: str) -> frozenset[tuple[str, str]]:
    """The (setting, method) cells a table's (and its profile's) `skip` list leaves out: "<setting>/<method>",
    each naming a setting and a method of the table (a typo would otherwise run the cell)."""
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ConfigError(f"{spec['path']}: {where} must be a list of \"<setting>/<method>\"; got {entries!r}")
    cells = set()
    for entry in entries:
        setting, _, method = entry.partition("/")
        if setting not in spec["settings"] or method not in spec["methods"]:
            raise ConfigError(f"{spec['path']}: {where}: {entry!r} must be \"<setting>/<method>\" of the table; "
                              f"settings: {', '.join(spec['settings'])}; methods: {', '.join(spec['methods'])}")
        cells.add((setting, method))
    return frozenset(cells)


def track_runs_dir(spec: dict, runs_dir: Path) -> Path:
    """Where a profile's runs live: `runs_dir`, or `runs_dir/<track>` for a track's profile (`profile_spec`)."""
    return runs_dir / spec["track"] if spec.get("track") else runs_dir


def expand(spec: dict, profile: str, seeds: int | None, runs_dir: Path) -> list[Run]:
    """Every run of `profile` (settings x methods x seeds), with the profile's own entries (`profile_spec`)."""
    spec = profile_spec(spec, profile)
    runs_dir = track_runs_dir(spec, runs_dir)
    prof = spec["profiles"][profile]
    config = (spec["path"].parent / prof["config"]).resolve()
    n = seeds or prof.get("seeds", 3)
    runs = []
    for setting, s_over in spec["settings"].items():
        for method, m_over in spec["methods"].items():
            if (setting, method) in spec["skipped"]:
                continue
            for seed in range(n):
                own = (f"run.experiment={spec['name']}", f"run.setting={setting}", f"run.method_label={method}",
                       f"run.seed={seed}", f"run.out_dir={runs_dir}")
                runs.append(Run(setting, method, seed, config, (*s_over, *m_over, *own)))
    return runs


def run_config(run: Run) -> Config:
    return load_config(run.config, list(run.overrides))


def run_dir(run: Run) -> Path:
    return run_dir_for(run_config(run))


def check_done_run(run: Run, directory: Path) -> None:
    """A finished run is reused only if it was trained with this run's config (e.g. not another profile's)."""
    differ = config_diff(load_config(directory / "config.toml", stored=True), run_config(run), ignore=EXECUTION_KEYS)
    if differ:
        shown = ", ".join(f"{k} = {saved!r}, wanted {wanted!r}" for k, (saved, wanted) in list(differ.items())[:3])
        raise ConfigError(f"{directory} holds a finished run with another config ({shown}); "
                          "remove it or pass another --runs-dir (each profile wants its own)")


def train_args(run: Run, threads: int) -> list[str]:
    """The `mlml` arguments of one run: `train --config ... --resume --set ...`."""
    args = ["train", "--config", str(run.config), "--resume"]
    for o in (*run.overrides, f"run.threads={threads}", "run.progress=false"):
        args += ["--set", o]
    return args


def train_command(run: Run, threads: int, torchrun: int = 0) -> list[str]:
    """The command line of one run: `python -m mlml train ...`, under torchrun if `torchrun` > 0."""
    if torchrun > 0:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "-m", "mlml"]
    else:
        head = [sys.executable, "-m", "mlml"]
    return [*head, *train_args(run, threads)]


class ReproductionStopped(Exception):
    """A local reproduction stopped by a signal (`mlml.launchers.STOP_SIGNALS`); its runs wrote their checkpoints."""


class LocalRuns:
    """The training subprocesses of a local reproduction, so that stopping it stops them cleanly.

    Each run is a process of its own session: a signal to the reproduction (or to its process group:
    `kill -TERM -PGID`, Ctrl-C, a closed terminal's SIGHUP) reaches the trainers once, through `stop`
    (`mlml.launchers.relaying_stop_signals`), which sends each running one SIGTERM (the trainer
    writes `last.pt` after its step and exits) and starts no more.
    Without this a stopped reproduction left its runs training, unseen, holding their run locks.
    A second signal is forwarded too, and stops the trainers at once (`mlml.trainer.stop_on_signals`).
    """

    def __init__(self) -> None:
        self.procs: set[subprocess.Popen] = set()
        self.stop_signal: int | None = None
        self.lock = threading.Lock()

    def run(self, command: list[str]) -> tuple[int, str]:
        """(exit code, stderr) of `command`; `ReproductionStopped` instead once `stop` has been called."""
        with self.lock:
            if self.stop_signal is not None:
                raise ReproductionStopped("not started")
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
            self.procs.add(proc)
        try:
            _, err = proc.communicate()
        finally:
            with self.lock:
                self.procs.discard(proc)
        if self.stop_signal is not None and proc.returncode != 0:
            raise ReproductionStopped(f"stopped with exit code {proc.returncode}")
        return proc.returncode, err

    def stop(self, signum: int, frame=None) -> None:
        """The handler of `mlml.launchers.STOP_SIGNALS`: SIGTERM to every running trainer, none started after."""
        self.stop_signal = signum
        with self.lock:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)


def launch(run: Run, threads: int, torchrun: int = 0, local: LocalRuns | None = None) -> None:
    """Train one run in a subprocess (resuming its last checkpoint if it was interrupted)."""
    code, err = (local or LocalRuns()).run(train_command(run, threads, torchrun))
    if code != 0:
        raise RuntimeError(f"run {run.setting}/{run.method}/seed{run.seed} failed:\n{err[-3000:]}")


@contextlib.contextmanager
def table_lock(lock: Path, what: str, wait: bool = False, poll: float = 2.0) -> Iterator[None]:
    """Hold `lock` (`mlml.files.FileLock`: owner pid, host and start; a dead local owner's lock is
    taken over) while the block runs; if a live process holds it, `LockedError` names it, or with
    `wait` the lock is waited for."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = FileLock(lock, what)
    while True:
        try:
            holder.acquire()
            break
        except LockedError:
            if not wait:
                raise
            time.sleep(poll)
    try:
        yield
    finally:
        holder.release()


def reproduce(
    name: str,
    profile: str,
    seeds: int | None = None,
    jobs: int = 1,
    runs_dir: Path = Path("runs"),
    results_dir: Path = Path("results"),
    torchrun: int = 0,
    launcher: SlurmLauncher | None = None,
    wait_lock: bool = False,
    only: list[str] | None = None,
) -> str:
    """Run every missing run of a table, then rebuild and return its Markdown table.

    Runs are subprocesses, `jobs` at a time, each under `torchrun --nproc_per_node=<torchrun>`
    when `torchrun` > 0; or, with a `launcher`, its jobs (`mlml.launchers`). A run whose
    `metrics.json` exists is not trained again. One reproduction of a table at a time per runs
    directory (`<runs_dir>/<table>/reproduce.lock`): a second one refuses, naming the first's pid
    and host, or with `wait_lock` waits for it to finish.

    `only`: patterns of "<setting>/<method>" cells (shell wildcards, e.g. "*/mean_teacher_em"): train
    the missing runs of those cells alone, e.g. a row just added; the table and its measured cost
    are written only once every run of the profile is done (a later call without `only` does it).
    """
    spec = read_table(name)
    lock_dir = track_runs_dir(profile_spec(spec, profile), runs_dir)
    with table_lock(lock_dir / spec["name"] / "reproduce.lock", f"table {spec['name']} in {lock_dir}", wait_lock):
        return _reproduce(spec, name, profile, seeds, jobs, runs_dir, results_dir, torchrun, launcher, only)


def selected_runs(runs: list[Run], only: list[str]) -> list[Run]:
    """The runs of the cells that `only`'s "<setting>/<method>" patterns (fnmatch) name; a pattern that
    names no cell of the table is an error (a typo would otherwise train nothing and say so quietly)."""
    cells = sorted({f"{r.setting}/{r.method}" for r in runs})
    for pattern in only:
        if not fnmatch.filter(cells, pattern):
            raise ConfigError(f"--only {pattern!r} names no cell of the table; its cells: {', '.join(cells)}")
    return [r for r in runs if any(fnmatch.fnmatchcase(f"{r.setting}/{r.method}", p) for p in only)]


def _reproduce(spec: dict, name: str, profile: str, seeds: int | None, jobs: int, runs_dir: Path, results_dir: Path, torchrun: int,
               launcher: SlurmLauncher | None, only: list[str] | None = None) -> str:
    runs = expand(spec, profile, seeds, runs_dir)
    fingerprint = profile_fingerprint(spec, profile)       # of what is trained, before the files can change
    dirs = {r: run_dir(r) for r in runs}
    todo = [r for r in runs if not (dirs[r] / "metrics.json").exists()]
    for r in runs:
        if r not in todo:
            check_done_run(r, dirs[r])
    missing = len(todo)
    if only:
        chosen = set(selected_runs(runs, only))
        todo = [r for r in todo if r in chosen]
    print(f"{name} ({profile}): {len(runs)} runs, {len(runs) - missing} already done, {len(todo)} to run"
          + (f" (--only; {missing - len(todo)} more missing)" if only else ""), file=sys.stderr)
    spec = profile_spec(spec, profile)
    write_table_layout(track_runs_dir(spec, runs_dir) / spec["name"], spec["name"], spec["metrics"])
    threads = max(1, (os.cpu_count() or 1) // (max(1, jobs) * max(1, torchrun)))
    start = time.perf_counter()
    if launcher is not None:
        if not launch_jobs(launcher, todo, dirs):
            return f"{n_runs(len(todo))} submitted or queued; `mlml reproduce {name} --status` follows them, this command again writes the table once they are done"
    else:
        train_locally(todo, jobs, threads, torchrun, f"mlml reproduce {name} --profile {profile}")
    wall = time.perf_counter() - start
    left = [r for r in runs if not (dirs[r] / "metrics.json").exists()] if only else []
    if left:        # `only` left other runs missing: no partial table
        return (f"{n_runs(len(runs) - len(left))} of {len(runs)} done; the table is written once every run is: "
                f"`mlml reproduce {name} --profile {profile}` trains the {n_runs(len(left))} left; "
                f"`mlml table {track_runs_dir(spec, runs_dir) / spec['name']} --results-dir DIR` tables the runs done so far")
    results = [read_result(dirs[r] / "metrics.json") for r in runs]
    if todo:       # a launcher's wall time includes queueing: not a measure of the profile's cost
        complete = len(todo) == len(runs) and launcher is None
        record_timing(spec["name"], profile, results, wall if complete else None, jobs, torchrun, results_dir, fingerprint)
    command = f"mlml reproduce {name} --profile {profile}" + (f" --seeds {seeds}" if seeds else "")
    return write_table(spec, results, results_dir, command, wall_time(read_timing(results_dir, spec["name"]), profile, results))


def progress(line: str) -> None:
    """A progress line on stderr; a closed stderr (`2>&1 | head`) loses the line, never a finished run."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError):        # ValueError: stderr already closed by the interpreter
        pass


def train_locally(todo: list[Run], jobs: int, threads: int, torchrun: int, again: str) -> None:
    """Train `todo`, `jobs` runs at a time; on SIGTERM, SIGINT or SIGHUP stop them (`LocalRuns`) and raise
    `ReproductionStopped` once every running one has written its checkpoint and exited."""
    local = LocalRuns()
    failures: list[BaseException] = []
    finished = iter(range(1, len(todo) + 1))          # next() is atomic under the GIL

    def one(run: Run) -> None:
        name = f"{run.setting}/{run.method}/seed{run.seed}"
        try:
            launch(run, threads, torchrun, local)
        except ReproductionStopped:
            return
        except Exception:
            progress(f"  failed {name} (the other runs go on)")
            raise
        progress(f"  finished {next(finished)}/{len(todo)}: {name}")

    with relaying_stop_signals(local.stop), ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(one, r) for r in todo]:
            if future.exception() is not None:
                failures.append(future.exception())
    if local.stop_signal is not None:
        raise ReproductionStopped(f"stopped by {signal.Signals(local.stop_signal).name}: the runs in progress wrote their "
                                  f"checkpoints; `{again}` resumes them")
    if failures:
        raise failures[0]


def read_result(path: Path) -> dict:
    """A run's `metrics.json`; runs recorded before metrics.json held the config get it from the
    `config.toml` beside it (when there is one), so tables can still compare them."""
    try:
        result = json.loads(path.read_text())
        if not isinstance(result, dict) or not {"metrics", "setting", "method", "seed"} <= set(result):
            raise ValueError("not the metrics.json of a run (metrics, setting, method, seed)")
        config = path.parent / "config.toml"
        if "config" not in result and config.is_file():
            with open(config, "rb") as f:
                result["config"] = from_dict(Config, upgrade_stored_config(tomllib.load(f))).to_dict()
        elif "config" in result:             # spelled as today, so runs of older mlml versions compare with new ones
            result["config"] = upgrade_stored_config(result["config"])
    except FileNotFoundError:                     # a run that has not (yet) written its results
        raise
    except (OSError, ValueError) as err:          # JSON, TOML and config errors are ValueErrors
        raise ConfigError(f"{path}: cannot be read as a run's results: {err}") from None
    return result


def launch_jobs(launcher: SlurmLauncher, todo: list[Run], dirs: dict[Run, Path]) -> bool:
    """Hand the runs to a launcher (SLURM jobs); True once all are done, False if it did not wait."""
    return launcher.run({dirs[r]: train_args(r, launcher.threads) for r in todo})


def launcher_resources(name: str, profile: str, overrides: list[str]) -> SlurmResources:
    """A table's SLURM resources: `[launcher.slurm]`, then `[profiles.<profile>.launcher.slurm]`, then `overrides`."""
    spec = read_table(name)
    if profile not in spec["profiles"]:
        raise ConfigError(f"table '{spec['name']}' has no profile '{profile}'; known: {', '.join(spec['profiles'])}")
    sections = [launcher_section(spec), launcher_section(spec, "profiles", profile)]
    return slurm_resources(sections, overrides, f"{spec['path']}: launcher.slurm")


def status(name: str, profile: str, seeds: int | None = None, runs_dir: Path = Path("runs")) -> str:
    """Each run of a table as done, running (a scheduler's job, or a live process of this host
    holding its run lock), pending, failed (with its log's last lines), stopped (a checkpoint but neither) or
    missing, from the run directories and the scheduler; and the training time left (`training_left`)."""
    spec = read_table(name)
    runs = expand(spec, profile, seeds, runs_dir)
    dirs = {r: run_dir(r) for r in runs}
    states = run_states(list(dirs.values()))
    lines = []
    for r in runs:
        s = states[dirs[r]]
        lines.append(f"{r.setting}/{r.method}/seed{r.seed}: {s.state}" + (f" ({s.job})" if s.job else ""))
        lines.extend(f"    | {line}" for line in s.log.splitlines())
    counts = {k: sum(s.state == k for s in states.values()) for k in ("done", "running", "pending", "failed", "stopped", "missing")}
    summary = f"{name} ({profile}): {n_runs(len(runs))}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    if counts["done"] == len(runs):
        summary += f"; `mlml reproduce {name} --profile {profile}` writes the table"
    else:
        left = training_left(runs, dirs, done={r for r in runs if states[dirs[r]].state == "done"})
        if left is not None:
            summary += f"; about {left[0] / 3600:.1f} h of training left ({left[1]})"
    return "\n".join([summary, *lines])


def training_left(runs: list[Run], dirs: dict[Run, Path], done: set[Run], here: str | None = None) -> tuple[float, str] | None:
    """Seconds of training the runs not in `done` would take, each estimated from the `train_seconds` of
    the done seeds of its cell, else of its method in other settings, else of all done runs; None when
    no run is done. With it, how it was estimated.

    A table carried between machines (`mlml runs export/import`) holds runs of several: where some
    done runs ran on this one (`here`, `provenance.hardware`), the others' times are scaled to it by
    each machine's speed relative to this one (the median, over the methods both ran, of the ratio of
    their mean times); a machine that shares no method with this one is taken as is."""
    seconds: dict[Run, float] = {}
    machine: dict[Run, str] = {}
    for r in done:
        try:
            result = json.loads((dirs[r] / "metrics.json").read_text())
            seconds[r] = float(result["train_seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        recorded = result.get("provenance")
        machine[r] = str(recorded.get("hardware", "")) if isinstance(recorded, dict) else ""
    if not seconds:
        return None
    how = "from the done runs' train_seconds"
    if here is None and len(set(machine.values())) > 1:        # one machine: nothing to scale, no torch import
        from mlml.provenance import hardware
        here = hardware()
    factors = speed_factors(seconds, machine, here) if here is not None else {}
    if factors:
        seconds = {r: t * factors.get(machine[r], 1.0) for r, t in seconds.items()}
        how += ", those of other machines scaled to this one's speed (" + ", ".join(
            f"x{f:.2f}" for f in sorted(factors.values())) + ")"
    by_cell: dict[tuple[str, str], list[float]] = {}
    by_method: dict[str, list[float]] = {}
    for r, t in seconds.items():
        by_cell.setdefault((r.setting, r.method), []).append(t)
        by_method.setdefault(r.method, []).append(t)
    overall = statistics.fmean(seconds.values())
    left = sum(statistics.fmean(by_cell.get((r.setting, r.method)) or by_method.get(r.method) or [overall])
               for r in runs if r not in done)
    return left, how


def speed_factors(seconds: dict[Run, float], machine: dict[Run, str], here: str) -> dict[str, float]:
    """{another machine: factor that turns its train_seconds into this machine's}, for each machine that
    ran a method this one ran too (median over those methods of mean time here / mean time there)."""
    times: dict[tuple[str, str], list[float]] = {}
    for r, t in seconds.items():
        times.setdefault((machine[r], r.method), []).append(t)
    mean = {key: statistics.fmean(ts) for key, ts in times.items()}
    factors = {}
    for other in {m for m in machine.values() if m != here}:
        ratios = [mean[(here, method)] / mean[(m, method)] for m, method in mean
                  if m == other and (here, method) in mean and mean[(m, method)] > 0]
        if ratios:
            factors[other] = statistics.median(ratios)
    return factors


def collect(root: Path) -> list[dict]:
    """Every `metrics.json` below `root`."""
    return [read_result(p) for p in sorted(root.rglob("metrics.json"))]


def table_keys(spec: dict) -> set[str]:
    """The config keys a table varies: those its settings (or its methods) do not all set alike."""
    varied = set()
    for group in ("settings", "methods"):
        entries = [dict((".".join(k), v) for k, v in map(parse_override, over)) for over in spec.get(group, {}).values()]
        for key in {k for e in entries for k in e}:
            if any(e.get(key, None) != entries[0].get(key, None) for e in entries):
                varied.add(key)
    return varied


def check_comparable(spec: dict, results: list[dict]) -> None:
    """Refuse to aggregate runs that are not comparable; the error says which keys differ.

    Seeds of one cell (setting, method) must differ in nothing but the seed (and how they were
    executed, `EXECUTION_KEYS`) and share their splits (`split_hash`), each seed once; across the
    table, runs may differ only in the keys the table varies (its settings' and methods' overrides).
    Runs that recorded no config or splits (made before they were recorded) are not compared on them.
    """
    own = (*EXECUTION_KEYS, "run.seed")
    table = (*own, "run.setting", "run.method_label", *table_keys(spec))
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        cells.setdefault((r["setting"], r["method"]), []).append(r)
    for (setting, method), rs in cells.items():
        name = f"{setting}/{method}"
        seeds = [r["seed"] for r in rs]
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"table {spec['name']!r}: {name} has seed {max(seeds, key=seeds.count)} more than once; "
                              "remove the copies (or pass a runs directory holding one table)")
        first = rs[0]
        for r in rs[1:]:
            if first.get("split_hash") and r.get("split_hash") and first["split_hash"] != r["split_hash"]:
                raise ConfigError(f"table {spec['name']!r}: {name} seed{first['seed']} and seed{r['seed']} were made on "
                                  f"different splits ({first['split_hash']} vs {r['split_hash']}); they cannot share a row")
            _refuse_differences(spec, f"{name} seed{first['seed']} and seed{r['seed']}", first, r, own)
    if not (spec.get("settings") or spec.get("methods")):       # no table file: its variables are unknown
        return
    for r in results[1:]:
        _refuse_differences(spec, f"{results[0]['setting']}/{results[0]['method']} seed{results[0]['seed']} and "
                                  f"{r['setting']}/{r['method']} seed{r['seed']}", results[0], r, table)


def _refuse_differences(spec: dict, what: str, a: dict, b: dict, ignore: tuple[str, ...]) -> None:
    if "config" not in a or "config" not in b:
        return
    differ = config_diff(a["config"], b["config"], ignore)
    # a table that varies a table-valued key (`data.groups={pattern = {...}}`) varies every key under it
    differ = {k: v for k, v in differ.items() if not any(k.startswith(f"{key}.") for key in ignore)}
    if differ:
        shown = "; ".join(f"{k}: {x!r} vs {y!r}" for k, (x, y) in list(differ.items())[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise ConfigError(f"table {spec['name']!r}: {what} differ in keys the table does not vary: {shown}{more}; "
                          "they cannot share a table")


def n_runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run_provenance(results: list[dict], key: str) -> str:
    """The distinct values of the runs' recorded provenance `key`, with how many runs had each."""
    counts: dict[str, int] = {}
    for r in results:
        value = r.get("provenance", {}).get(key, "not recorded")
        counts[value] = counts.get(value, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{v} ({n_runs(n)})" for v, n in counts.items())


def split_of(result: dict) -> str:
    """The run's split definition (`split_hash` in metrics.json; older runs did not record it)."""
    return result.get("split_hash", "not recorded")


def split_rows(results: list[dict]) -> list[dict]:
    """The results, with the split in the method name when the runs used several splits (rows never mix splits)."""
    if len({r["split_hash"] for r in results if "split_hash" in r}) < 2:    # runs that recorded none are not compared
        return results
    return [{**r, "method": f"{r['method']} [split {split_of(r)}]"} for r in results]


def provenance(command: str, results: list[dict], wall: str = "not recorded") -> list[str]:
    train_seconds = sum(r.get("train_seconds", 0.0) for r in results)
    splits: dict[str, int] = {}
    for r in results:
        splits[split_of(r)] = splits.get(split_of(r), 0) + 1
    return [
        f"Command: `{command}`",
        f"Commit: {run_provenance(results, 'commit')}; {run_provenance(results, 'versions')}",
        f"Hardware: {run_provenance(results, 'hardware')}",
        "Splits (split_hash): " + "; ".join(f"{h} ({n_runs(n)})" for h, n in splits.items()),
        f"Training time: {n_runs(len(results))}, {minutes(train_seconds)} in total (sum of the runs' train_seconds)",
        f"Wall time: {wall}",
    ]


def timing_file(results_dir: Path, name: str) -> Path:
    return results_dir / f"{name}.timing.json"


def profile_fingerprint(spec: dict, profile: str) -> str:
    """A hash (16 hex digits) of what `profile`'s runs are asked to compute: its config file with its
    bases, parsed (comments and layout do not count), and the settings and methods it runs.

    Recorded beside a measured cost, so that `--list` can say when the profile changed since.
    """
    spec = profile_spec(spec, profile)
    config = read_toml_with_bases((spec["path"].parent / spec["profiles"][profile]["config"]).resolve())
    asked = {"config": config, "settings": spec["settings"], "methods": spec["methods"]}
    if spec["skipped"]:         # only when set: fingerprints recorded before `skip` existed stay valid
        asked["skip"] = sorted("/".join(cell) for cell in spec["skipped"])
    text = json.dumps(asked, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# what a reproduction that trained every run records beside a profile's cost (`record_timing`)
WALL_KEYS = ("wall_seconds", "jobs", "torchrun", "wall_commit")


def record_timing(name: str, profile: str, results: list[dict], wall: float | None, jobs: int, torchrun: int, results_dir: Path,
                  fingerprint: str | None = None) -> None:
    """Update `results/<table>.timing.json`: what `profile` costs, measured; shown by `--list`.

    `wall` is the wall time of a reproduction that trained every run (None if some were done
    already: then the last complete measurement is kept, unless it measured another configuration
    of the profile: a wall time recorded under a different `fingerprint`, the profile's
    (`profile_fingerprint`) when it was measured, is dropped rather than shown beside these runs).
    """
    path = timing_file(results_dir, name)
    timing = json.loads(path.read_text()) if path.exists() else {}
    entry = timing.get(profile, {})
    if wall is None and fingerprint is not None and entry.get("fingerprint") != fingerprint:
        for key in WALL_KEYS:
            entry.pop(key, None)
    entry.update(runs=len(results), seeds=len({r["seed"] for r in results}),
                 train_seconds=round(sum(r.get("train_seconds", 0.0) for r in results), 1), hardware=run_provenance(results, 'hardware'), commit=run_provenance(results, 'commit'))
    if fingerprint is not None:
        entry["fingerprint"] = fingerprint
    if wall is not None:
        entry.update(zip(WALL_KEYS, (round(wall, 1), jobs, torchrun, entry["commit"])))
    timing[profile] = entry
    results_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timing, indent=2) + "\n")


def measured_cost(entry: dict) -> str:
    seeds = f" ({entry['seeds']} seed{'' if entry['seeds'] == 1 else 's'})" if "seeds" in entry else ""
    text = f"measured: {n_runs(entry['runs'])}{seeds}, {minutes(entry['train_seconds'])} of training on {entry['hardware']}"
    if "wall_seconds" in entry:
        how = f"--jobs {entry['jobs']}" + (f" --torchrun {entry['torchrun']}" if entry.get("torchrun") else "")
        text += f"; {minutes(entry['wall_seconds'])} wall with {how}"
    return text


def aggregate(results: list[dict], metrics: list[str]) -> dict[tuple[str, str], dict[str, tuple[float, float, int]]]:
    """(setting, method) -> metric -> (mean, sample std, number of seeds)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["setting"], r["method"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {}
        for m in metrics:
            values = [r["metrics"][m] for r in rs if m in r["metrics"]]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                out[key][m] = (statistics.fmean(values), std, len(values))
    return out


def markdown(spec: dict, agg: dict, command: str, results: list[dict], wall: str = "not recorded") -> tuple[str, str]:
    settings = list(spec["settings"]) if spec.get("settings") else sorted({s for s, _ in agg})
    methods = list(spec["methods"]) if spec.get("methods") else sorted({m for _, m in agg})
    split_methods = sorted({m for _, m in agg} - set(methods))      # runs on several splits: "<method> [split <hash>]"
    if split_methods:
        methods = [m for m in methods if any(k[1] == m for k in agg)] + split_methods
    metrics = spec["metrics"]
    conv = row_convergence(results)
    conv_settings = [s for s in settings if any(k[0] == s for k in conv)]
    header = (["method"] + [f"{m} ({s})" if len(settings) > 1 else m for s in settings for m in metrics]
              + [f"best epoch (max)/epochs, slope ({s})" if len(settings) > 1 else "best epoch (max)/epochs, slope" for s in conv_settings]
              + ["seeds"])
    lines = [f"# {spec['title']}", "", *[f"{line}  " for line in provenance(command, results, wall)], "",
             "Mean ± sample standard deviation over seeds; test split, full labels.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["setting", "method", "metric", "mean", "std", "seeds"])
    for method in methods:
        cells, n = [], 0
        for s in settings:
            for m in metrics:
                v = agg.get((s, method), {}).get(m)
                cells.append(f"{v[0]:.4f} ± {v[1]:.4f}" if v else "–")
                if v:
                    n = max(n, v[2])
                    writer.writerow([s, method, m, f"{v[0]:.6f}", f"{v[1]:.6f}", v[2]])
        cells += [conv[(s, method)].cell() if (s, method) in conv else "n/a" for s in conv_settings]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {n} |")
    convergence_rows(writer, conv, [(s, m) for m in methods for s in settings])
    lines += convergence_note(conv, [(s, m) for s in settings for m in methods])
    return "\n".join(lines) + "\n", buf.getvalue()


def convergence_rows(writer, conv: dict[tuple[str, str], RowConvergence], order: list[tuple[str, str]]) -> None:
    """The table CSV's convergence lines per row: best epoch and slope (mean, std, seeds) as metrics `convergence/...`."""
    for key in order:
        if key not in conv:
            continue
        c = conv[key]
        for name, values in (("best_epoch", [x.best_epoch for x in c.runs]), ("slope_per_epoch", [x.slope for x in c.runs])):
            if None not in values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                writer.writerow([*key, f"convergence/{name}", f"{statistics.fmean(values):.6f}", f"{std:.6f}", len(values)])


def write_table(spec: dict, results: list[dict], results_dir: Path | None, command: str, wall: str = "not recorded") -> str:
    """The table's Markdown (written with its `.csv` and per-run `.runs.csv` to `results_dir` if given):
    header with provenance, one row per method, the convergence footnote and the add-on section."""
    results = split_rows(results)
    check_comparable(spec, results)
    md, table_csv = markdown(spec, aggregate(results, spec["metrics"]), command, results, wall)
    metric = spec["metrics"][0]
    comparisons = addon_comparisons(spec, results, metric, results_dir or Path("results"))     # other tables' runs.csv: results/
    section = addon_section(comparisons, selection_key(results[0]), metric) if comparisons else []
    if section:
        md += "\n".join(section) + "\n"
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        name = spec.get("results", spec["name"])          # <table>, or <table>.<track> (profile_spec)
        (results_dir / f"{name}.md").write_text(md)
        (results_dir / f"{name}.csv").write_text(table_csv)
        (results_dir / f"{name}.runs.csv").write_text(runs_csv(spec, results, spec["metrics"]))
    return md


def table_from_runs(root: Path, results_dir: Path | None = None) -> str:
    """Rebuild a table from existing runs (and its TensorBoard layout at `root`); uses the table
    file named like the runs' experiment if there is one."""
    results = collect(root)
    if not results:
        raise FileNotFoundError(f"no metrics.json below {root}")
    name = results[0]["experiment"]
    try:
        spec = read_table(name)
    except ConfigError:
        spec = {"name": name, "title": name, "metrics": ["test/mAP_macro"], "settings": {}, "methods": {}}
    else:       # runs under <runs_dir>/<track>/<table>: the table as that track's profile runs it
        tracks = [p for p, prof in spec["profiles"].items() if prof.get("track") and prof["track"] == Path(root).resolve().parent.name]
        if tracks:
            spec = profile_spec(spec, tracks[0])
    write_table_layout(root, spec["name"], spec["metrics"])
    timing = read_timing(results_dir or Path("results"), spec["name"])
    return write_table(spec, results, results_dir, f"mlml table {root}", wall_time(timing, None, results))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def list_tables(results_dir: Path = Path("results")) -> str:
    """Every table with its profiles: seeds and cost, measured (timing.json) or else as written in the
    table; a cost measured before the profile's config or rows changed says so."""
    lines = []
    for path in sorted(TABLES_DIR.glob("*.toml")):
        spec = read_table(path.stem)
        timing_path = timing_file(results_dir, path.stem)
        timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
        settings, methods = len(spec["settings"]), len(spec["methods"])
        skipped = len(skipped_cells(spec, spec.get("skip", []), "skip"))
        left_out = f", {skipped} left out" if skipped else ""
        lines.append(f"{path.stem}: {spec['title']} ({plural(settings, 'setting')} x {plural(methods, 'method')}{left_out} = "
                     f"{plural(settings * methods - skipped, 'run')} a seed)")
        for prof, p in spec["profiles"].items():
            cost = measured_cost(timing[prof]) if prof in timing else p.get("cost", "cost not measured")
            recorded = timing.get(prof, {}).get("fingerprint")
            if recorded is not None and recorded != profile_fingerprint(spec, prof):
                cost += f" (at {timing[prof].get('commit', 'an earlier commit')}: its config or rows changed since)"
            track = f" [track {p['track']}: results/{profile_spec(spec, prof)['results']}.md]" if p.get("track") else ""
            runs = len(expand(spec, prof, None, Path("runs")))      # the profile's own settings and skip list
            lines.append(f"  --profile {prof}{track}: {p.get('seeds', 3)} seeds ({plural(runs, 'run')}), {cost}")
    return "\n".join(lines)


# ------------------------------------------------------------------ convergence: is the budget long enough?
IMPROVING_GAIN = 0.005     # still improving: the fitted trend gains this much (in the selection metric) over k more epochs


@dataclass(frozen=True)
class Convergence:
    """How a run's validation selection metric (`eval.select`) ended (`convergence`).

    `window` is k = max(3, ceil(E / 4)) epochs, E the last validated epoch; `slope` the least-squares
    slope per epoch of the metric over the validations of the last k epochs (at least the last 3).
    """

    select: str
    epochs: int
    best_epoch: int
    window: int
    slope: float | None        # None: fewer than 3 validations

    @property
    def gain(self) -> float | None:
        """What k more epochs would add at the current trend: slope x k."""
        return None if self.slope is None else self.slope * self.window

    @property
    def improving(self) -> bool:
        return self.gain is not None and self.gain >= IMPROVING_GAIN


def selection_key(result: dict) -> str:
    """The validation metric that chose the run's best checkpoint (`eval.select`; older runs: its default)."""
    return result.get("config", {}).get("eval", {}).get("select", "val/mAP_macro")


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    """Slope of the least-squares line through (xs, ys); xs not all equal."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def convergence(result: dict) -> Convergence | None:
    """The run's best epoch and end-of-training slope, from its `metrics.json` `history` (the
    validation record of every evaluated epoch) and `best_epoch`; None if it recorded no history."""
    select = selection_key(result)
    points = [(rec["epoch"], rec[select]) for rec in result.get("history", []) if select in rec]
    if not points:
        return None
    last = points[-1][0]
    window = max(3, math.ceil(last / 4))
    best = result.get("best_epoch", -1)
    if best < 1:                                   # the first epoch with the highest value, as the trainer picks it
        best = max(points, key=lambda p: p[1])[0]
    inside = [p for p in points if p[0] > last - window]
    if len(inside) < 3:                            # sparse validation (eval.every > 1): the last 3 validations
        inside = points[-3:]
    slope = least_squares_slope([x for x, _ in inside], [y for _, y in inside]) if len(inside) >= 3 else None
    return Convergence(select, last, best, window, slope)


@dataclass(frozen=True)
class RowConvergence:
    """The convergence of a row's seeds; the row is improving when the mean gain over its seeds is."""

    runs: tuple[Convergence, ...]

    @property
    def best_mean(self) -> float:
        return statistics.fmean(c.best_epoch for c in self.runs)

    @property
    def best_max(self) -> int:
        return max(c.best_epoch for c in self.runs)

    @property
    def epochs(self) -> int:
        return max(c.epochs for c in self.runs)

    @property
    def slope(self) -> float | None:
        slopes = [c.slope for c in self.runs if c.slope is not None]
        return statistics.fmean(slopes) if len(slopes) == len(self.runs) else None

    @property
    def gain(self) -> float | None:
        gains = [c.gain for c in self.runs if c.gain is not None]
        return statistics.fmean(gains) if len(gains) == len(self.runs) else None

    @property
    def improving(self) -> bool:
        return self.gain is not None and self.gain >= IMPROVING_GAIN

    @property
    def n_improving(self) -> int:
        return sum(c.improving for c in self.runs)

    def cell(self) -> str:
        slope = "slope n/a" if self.slope is None else f"{self.slope:+.4f}"
        return f"{self.best_mean:.1f} ({self.best_max})/{self.epochs}, {slope}" + (" ↑" if self.improving else "")


def row_convergence(results: list[dict]) -> dict[tuple[str, str], RowConvergence]:
    """(setting, method) -> the convergence of its runs, for the rows whose every run recorded a history."""
    rows: dict[tuple[str, str], list[Convergence | None]] = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        rows.setdefault((r["setting"], r["method"]), []).append(convergence(r))
    return {key: RowConvergence(tuple(cs)) for key, cs in rows.items() if all(c is not None for c in cs)}


def convergence_note(conv: dict[tuple[str, str], RowConvergence], order: list[tuple[str, str]]) -> list[str]:
    """The footnote under a table: what the convergence column means, and the rows still improving."""
    if not conv:
        return []
    select = next(iter(conv.values())).runs[0].select
    flagged = [key for key in order if key in conv and conv[key].improving]
    lines = ["", f"Convergence column: best epoch = the epoch of the best validation `{select}` (the checkpoint the test "
             "metrics come from), mean over seeds (max) / epochs trained; slope = least-squares slope per epoch of "
             f"validation `{select}` over the last k = max(3, ceil(epochs / 4)) epochs (at least 3 validations), mean "
             f"over seeds. ↑ still improving: mean slope x k >= {IMPROVING_GAIN} (at that trend, k more epochs would add "
             f"at least {IMPROVING_GAIN}); the runs' values are in the `.runs.csv` beside this table."]
    if flagged:
        shown = "; ".join(f"{s}/{m} (+{conv[(s, m)].gain:.4f} over {conv[(s, m)].runs[0].window} epochs, "
                          f"{conv[(s, m)].n_improving} of {len(conv[(s, m)].runs)} seeds improving)" for s, m in flagged)
        lines += ["", f"**Still improving ({len(flagged)} of {len(conv)} rows): {shown}.** Their numbers may rise with a longer budget."]
    else:
        lines += ["", f"No row is still improving ({len(conv)} rows)."]
    at_end = [f"{s}/{m}" for s, m in order if (s, m) in conv and not conv[(s, m)].improving
              and all(c.best_epoch == c.epochs for c in conv[(s, m)].runs)]
    if at_end:      # a weaker sign: under a decaying learning rate the slope flattens whether or not a longer budget helps
        lines += ["", f"Best at the last epoch in every seed, though not improving by the slope: {'; '.join(at_end)}."]
    return lines


def runs_csv(spec: dict, results: list[dict], metrics: list[str]) -> str:
    """One line per run: its seed, split, the add-ons it switched on, selection metric, convergence (best
    epoch, slope, gain, flag) and the table's metrics; other tables read it for their add-on section."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["setting", "method", "seed", "split_hash", "addons", "select", "select_value", "epochs", "best_epoch",
                     "window_epochs", "slope_per_epoch", "gain_over_window", "improving", *metrics])
    keys = list(dict.fromkeys([*ADDONS, *spec.get("addons", [])]))
    for r in sorted(results, key=lambda r: (r["setting"], r["method"], r["seed"])):
        c = convergence(r)
        select = selection_key(r)
        conv = ["", "", "", "", "", ""] if c is None else [
            c.epochs, c.best_epoch, c.window, "" if c.slope is None else f"{c.slope:.6f}",
            "" if c.gain is None else f"{c.gain:.6f}", c.improving]
        value = r["metrics"].get(select)
        addons = ";".join(k for k in keys if has_addon(r, k, spec))
        writer.writerow([r["setting"], r["method"], r["seed"], split_of(r), addons, select, "" if value is None else f"{value:.6f}", *conv,
                         *("" if r["metrics"].get(m) is None else f"{r['metrics'][m]:.6f}" for m in metrics)])
    return buf.getvalue()


# ------------------------------------------------------------------ add-on vs the best configuration without it
ADDONS = ("method.teacher", "method.domain_branch")    # a table's `addons` key replaces these


def check_addons(spec: dict) -> None:
    """A table's `addons`, if it has one, must be a list of config keys; its `[baselines]`, setting ->
    list of "<table>" or "<table>/<setting>" whose runs join the add-on section's "without" pool."""
    known = flat(Config().to_dict())
    addons = spec.get("addons", [])
    if not isinstance(addons, list) or not all(isinstance(a, str) for a in addons):
        raise ConfigError(f"{spec['path']}: 'addons' must be a list of config keys, e.g. [\"method.teacher\"]; got {addons!r}")
    for key in addons:
        if key not in known:
            raise ConfigError(f"{spec['path']}: addons: {key!r} is not a config key (e.g. {', '.join(ADDONS)})")
    for setting, refs in spec.get("baselines", {}).items():
        if setting not in spec["settings"]:
            raise ConfigError(f"{spec['path']}: baselines: {setting!r} is not a setting of the table; known: {', '.join(spec['settings'])}")
        if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
            raise ConfigError(f"{spec['path']}: baselines.{setting} must be a list of \"<table>\" or \"<table>/<setting>\"; got {refs!r}")


def has_addon(result: dict, key: str, spec: dict) -> bool:
    """Whether the run switched on add-on `key` (a config key that is off when empty, e.g. `method.teacher`):
    from its recorded config, or for runs that recorded none from the table's overrides of its row (rows read
    from another table's `.runs.csv` carry the add-ons that table recorded)."""
    if "addons_on" in result:
        return key in result["addons_on"]
    if "config" in result:
        return bool(flat(result["config"]).get(key))
    overrides = [*spec.get("settings", {}).get(result["setting"], []), *spec.get("methods", {}).get(result["method"], [])]
    values = [v for k, v in map(parse_override, overrides) if ".".join(k) == key]
    return bool(values and values[-1])


@dataclass(frozen=True)
class Pick:
    """A row chosen on validation: its mean validation selection metric and its test metric per seed."""

    method: str
    val: float
    test: dict[int, float]

    def test_text(self) -> str:
        values = list(self.test.values())
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def best_on_validation(rows: dict[str, list[dict]], select: str, metric: str) -> Pick | None:
    """The row with the highest mean `select` (validation) over its seeds; the first in table order on a tie.
    Rows lacking the validation or the test metric for a seed are not candidates."""
    best = None
    for method, rs in rows.items():
        if not all(select in r["metrics"] and metric in r["metrics"] for r in rs):
            continue
        pick = Pick(method, statistics.fmean(r["metrics"][select] for r in rs), {r["seed"]: r["metrics"][metric] for r in rs})
        if best is None or pick.val > best.val:
            best = pick
    return best


def difference(a: Pick, b: Pick) -> tuple[float, float | None, str]:
    """a - b on the test metric: mean, standard deviation over seeds and how it was paired.

    Same seeds (>= 2): paired by seed, the sample std of the per-seed differences. Otherwise unpaired,
    the difference of the means with sqrt(s_a^2 + s_b^2) (the std of one run of each); None when a
    std cannot be estimated (a single seed).
    """
    if set(a.test) == set(b.test) and len(a.test) >= 2:
        diffs = [a.test[s] - b.test[s] for s in sorted(a.test)]
        return statistics.fmean(diffs), statistics.stdev(diffs), f"paired by seed ({len(diffs)})"
    mean = statistics.fmean(a.test.values()) - statistics.fmean(b.test.values())
    if len(a.test) < 2 or len(b.test) < 2:
        return mean, None, f"unpaired ({len(a.test)} vs {len(b.test)} seeds)"
    std = math.sqrt(statistics.variance(a.test.values()) + statistics.variance(b.test.values()))
    return mean, std, f"unpaired ({len(a.test)} vs {len(b.test)} seeds)"


@dataclass(frozen=True)
class AddonComparison:
    addon: str
    setting: str
    with_it: Pick
    without: Pick
    diff: float
    std: float | None
    pairing: str


def addon_comparisons(spec: dict, results: list[dict], metric: str, results_dir: Path = Path("results")) -> list[AddonComparison]:
    """For each add-on (`spec["addons"]`, else `ADDONS`) and setting where some rows have it and some do
    not: the best row with it and the best row without it, both chosen on validation. The rows are the
    table's but its `label_references`, and those of other tables that `spec["baselines"]` names (their
    `<table>.runs.csv` in `results_dir`)."""
    if not results:
        return []
    select = selection_key(results[0])
    settings = list(dict.fromkeys(r["setting"] for r in results))
    extra = [b for setting in settings for b in baseline_runs(spec, setting, results, select, metric, results_dir)]
    references = label_references(spec)
    out = []
    for key in spec.get("addons", ADDONS):
        for setting in settings:
            pools: dict[bool, dict[str, list[dict]]] = {True: {}, False: {}}
            for r in results:
                if r["setting"] == setting and r["method"] not in references:
                    pools[has_addon(r, key, spec)].setdefault(r["method"], []).append(r)
            for r in extra:                    # other tables' rows are baselines: they join the pool without the add-on only
                if r["setting"] == setting and not has_addon(r, key, spec):
                    pools[False].setdefault(r["method"], []).append(r)
            with_it, without = (best_on_validation(pools[on], select, metric) for on in (True, False))
            if with_it and without:
                out.append(AddonComparison(key, setting, with_it, without, *difference(with_it, without)))
    return out


def methods_overriding(spec: dict, prefix: str) -> set[str]:
    """The table's methods whose overrides set a key starting with `prefix` (e.g. "data.")."""
    return {m for m, over in spec.get("methods", {}).items()
            if any(o.split("=", 1)[0].strip().startswith(prefix) for o in over)}


def label_references(spec: dict) -> set[str]:
    """The table's methods whose overrides change the labels (a `data.observation...` key, such as the
    full-label reference): a user with the setting's labels cannot run them, so they are on neither
    side of an add-on comparison."""
    return methods_overriding(spec, "data.observation")


def baseline_runs(spec: dict, setting: str, results: list[dict], select: str, metric: str, results_dir: Path) -> list[dict]:
    """The runs of other tables that `spec["baselines"][setting]` names ("<table>" for its rows of the same
    setting, "<table>/<setting>" for another), read from `<results_dir>/<table>.runs.csv`, as rows of
    `setting` named "<method> (<table>)". Each must share its seed's split with this table's runs of
    `setting` and have recorded `select` and `metric`; otherwise the error names the file and row."""
    runs = []
    splits = {r["seed"]: split_of(r) for r in results if r["setting"] == setting}
    for ref in spec.get("baselines", {}).get(setting, []):
        table, _, other = ref.partition("/")
        path = results_dir / f"{table}{'.' + spec['track'] if spec.get('track') else ''}.runs.csv"   # the same track's
        if not path.is_file():
            raise ConfigError(f"table {spec['name']!r}: baselines of {setting!r} name {ref!r} but {path} does not exist "
                              f"(`mlml reproduce {table}` or `mlml table runs/{table} --results-dir {results_dir}` writes it)")
        with open(path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if row["setting"] == (other or setting)]
        if not rows:
            raise ConfigError(f"{path}: no run of setting {other or setting!r} (named by table {spec['name']!r}'s baselines)")
        for row in rows:
            where = f"{path}: {row['setting']}/{row['method']} seed{row['seed']}"
            if row["select"] != select or not row["select_value"] or not row.get(metric):
                raise ConfigError(f"{where}: it recorded no {select} (validation) and {metric} to be compared")
            seed = int(row["seed"])
            if splits.get(seed) != row["split_hash"]:
                raise ConfigError(f"{where} was made on split {row['split_hash']}, this table's {setting} seed{seed} on "
                                  f"{splits.get(seed, 'no run')}: they cannot be compared")
            runs.append({"setting": setting, "method": f"{row['method']} ({table})", "seed": seed, "split_hash": row["split_hash"],
                         "addons_on": set(filter(None, row["addons"].split(";"))),
                         "metrics": {select: float(row["select_value"]), metric: float(row[metric])}})
    return runs


def addon_section(comparisons: list[AddonComparison], select: str, metric: str) -> list[str]:
    """The section under a table: each add-on against the best configuration of the table without it."""
    if not comparisons:
        return []
    lines = ["", "## Add-on vs the best configuration without it", "",
             f"For each add-on and setting, the best row with the add-on and the best row without it, each chosen on "
             f"validation `{select}` (mean over seeds, shown in brackets; the test metric never chooses), their "
             f"`{metric}` (mean ± sample std over seeds) and the difference with - without ± its standard deviation "
             "over seeds: of the per-seed differences when both rows have the same seeds (paired), else "
             "sqrt(s_with^2 + s_without^2). \"Without\" is every row of this table in that setting without the add-on, "
             "and the rows of other tables it names as baselines (\"method (table)\"), on the same splits.", "",
             "| add-on | setting | best with it (val) | test | best without it (val) | test | with - without | diff / std | pairing |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        std = "n/a" if c.std is None else f"{c.std:.4f}"
        ratio = "n/a" if not c.std else f"{c.diff / c.std:+.1f}"
        lines.append(f"| {c.addon.split('.')[-1]} | {c.setting} | {c.with_it.method} ({c.with_it.val:.4f}) | {c.with_it.test_text()} | "
                     f"{c.without.method} ({c.without.val:.4f}) | {c.without.test_text()} | {c.diff:+.4f} ± {std} | {ratio} | {c.pairing} |")
    return lines


# ------------------------------------------------------------------ wall time of the reproduction that made a table
def wall_time(timing: dict, profile: str | None, results: list[dict]) -> str:
    """The measured wall time (`<table>.timing.json`) of `profile`, or without a profile (`mlml table`) of
    the one profile whose recorded commit and number of runs are these runs'."""
    if profile is None:
        matching = [p for p, e in timing.items() if e.get("runs") == len(results) and e.get("commit") == run_provenance(results, "commit")]
        profile = matching[0] if len(matching) == 1 else None
    entry = timing.get(profile, {}) if profile else {}
    if "wall_seconds" not in entry:
        return "not recorded (the runs were not all trained by one `mlml reproduce`)"
    how = f"--jobs {entry['jobs']}" + (f" --torchrun {entry['torchrun']}" if entry.get("torchrun") else "")
    at = f" at commit {entry['wall_commit']}" if "wall_commit" in entry else ""
    return f"{minutes(entry['wall_seconds'])} with {how} (profile {profile}, the last reproduction that trained every run{at})"


def read_timing(results_dir: Path, name: str) -> dict:
    path = timing_file(results_dir, name)
    return json.loads(path.read_text()) if path.exists() else {}
