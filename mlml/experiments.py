"""Tables as experiments: expand a table's settings x methods x seeds, run what is missing, and
build Markdown/CSV tables from the runs' `metrics.json` files (never from logs).

A table is a TOML file in `experiments/tables/`:

    title = "..."
    metrics = ["test/mAP_macro", "test/f1_macro_calibrated"]
    [profiles.quick]                    # and [profiles.full]
    config = "../configs/quick.toml"    # relative to the table file
    seeds = 3
    cost = "about 6 min on 2 CPU cores"   # shown by --list until a reproduction was measured
    [settings]                          # setting name -> config overrides
    single_positive = ["data.observation=single_positive"]
    [methods]                           # method name -> config overrides
    an = ["method.loss=an"]

`reproduce` writes `results/<table>.md` and `.csv`, and `results/<table>.timing.json` with the
measured cost of each profile (summed `train_seconds` of the runs, wall time of the last complete
reproduction, hardware) that `mlml reproduce --list` shows. It also writes a TensorBoard
custom-scalars layout at `runs/<table>/` (one chart per metric comparing every run).

Tables only aggregate comparable runs (`check_comparable`): the seeds of one cell must share
their config (but the seed) and their splits (`split_hash` in metrics.json), and the runs of a
table may differ only in the keys the table varies; otherwise the error names the keys that differ.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mlml.config import EXECUTION_KEYS, Config, ConfigError, config_diff, from_dict, load_config, parse_override, run_dir_for
from mlml.files import FileLock, LockedError
from mlml.launchers import SlurmLauncher, SlurmResources, launcher_section, run_states, slurm_resources
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
    return spec


def expand(spec: dict, profile: str, seeds: int | None, runs_dir: Path) -> list[Run]:
    if profile not in spec["profiles"]:
        raise ConfigError(f"table '{spec['name']}' has no profile '{profile}'; known: {', '.join(spec['profiles'])}")
    prof = spec["profiles"][profile]
    config = (spec["path"].parent / prof["config"]).resolve()
    n = seeds or prof.get("seeds", 3)
    runs = []
    for setting, s_over in spec["settings"].items():
        for method, m_over in spec["methods"].items():
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


def launch(run: Run, threads: int, torchrun: int = 0) -> None:
    """Train one run in a subprocess (resuming its last checkpoint if it was interrupted)."""
    done = subprocess.run(train_command(run, threads, torchrun), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run {run.setting}/{run.method}/seed{run.seed} failed:\n{done.stderr[-3000:]}")


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
) -> str:
    """Run every missing run of a table, then rebuild and return its Markdown table.

    Runs are subprocesses, `jobs` at a time, each under `torchrun --nproc_per_node=<torchrun>`
    when `torchrun` > 0; or, with a `launcher`, its jobs (`mlml.launchers`). A run whose
    `metrics.json` exists is not trained again. One reproduction of a table at a time per runs
    directory (`<runs_dir>/<table>/reproduce.lock`): a second one refuses, naming the first's pid
    and host, or with `wait_lock` waits for it to finish.
    """
    spec = read_table(name)
    with table_lock(runs_dir / spec["name"] / "reproduce.lock", f"table {spec['name']} in {runs_dir}", wait_lock):
        return _reproduce(spec, name, profile, seeds, jobs, runs_dir, results_dir, torchrun, launcher)


def _reproduce(spec: dict, name: str, profile: str, seeds: int | None, jobs: int, runs_dir: Path, results_dir: Path, torchrun: int,
               launcher: SlurmLauncher | None) -> str:
    runs = expand(spec, profile, seeds, runs_dir)
    dirs = {r: run_dir(r) for r in runs}
    todo = [r for r in runs if not (dirs[r] / "metrics.json").exists()]
    for r in runs:
        if r not in todo:
            check_done_run(r, dirs[r])
    print(f"{name} ({profile}): {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run", file=sys.stderr)
    write_table_layout(runs_dir / spec["name"], spec["name"], spec["metrics"])
    threads = max(1, (os.cpu_count() or 1) // (max(1, jobs) * max(1, torchrun)))
    start = time.perf_counter()
    if launcher is not None:
        if not launch_jobs(launcher, todo, dirs):
            return f"{n_runs(len(todo))} submitted or queued; `mlml reproduce {name} --status` follows them, this command again writes the table once they are done"
    else:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for i, _ in enumerate(pool.map(lambda r: launch(r, threads, torchrun), todo)):
                print(f"  finished {i + 1}/{len(todo)}", file=sys.stderr)
    wall = time.perf_counter() - start
    results = [read_result(dirs[r] / "metrics.json") for r in runs]
    if todo:       # a launcher's wall time includes queueing: not a measure of the profile's cost
        complete = len(todo) == len(runs) and launcher is None
        record_timing(spec["name"], profile, results, wall if complete else None, jobs, torchrun, results_dir)
    command = f"mlml reproduce {name} --profile {profile}" + (f" --seeds {seeds}" if seeds else "")
    return write_table(spec, results, results_dir, command)


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
    """Each run of a table as done, running, pending, failed (with its log's last lines), stopped
    (a checkpoint but no job) or missing, from the run directories and the scheduler."""
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
    return "\n".join([summary, *lines])


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


def provenance(command: str, results: list[dict]) -> list[str]:
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
    ]


def timing_file(results_dir: Path, name: str) -> Path:
    return results_dir / f"{name}.timing.json"


def record_timing(name: str, profile: str, results: list[dict], wall: float | None, jobs: int, torchrun: int, results_dir: Path) -> None:
    """Update `results/<table>.timing.json`: what `profile` costs, measured; shown by `--list`.

    `wall` is the wall time of a reproduction that trained every run (None if some were done
    already: then the last complete measurement is kept).
    """
    path = timing_file(results_dir, name)
    timing = json.loads(path.read_text()) if path.exists() else {}
    entry = timing.get(profile, {})
    entry.update(runs=len(results), seeds=len({r["seed"] for r in results}),
                 train_seconds=round(sum(r.get("train_seconds", 0.0) for r in results), 1), hardware=run_provenance(results, 'hardware'), commit=run_provenance(results, 'commit'))
    if wall is not None:
        entry.update(wall_seconds=round(wall, 1), jobs=jobs, torchrun=torchrun)
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


def markdown(spec: dict, agg: dict, command: str, results: list[dict]) -> tuple[str, str]:
    settings = list(spec["settings"]) if spec.get("settings") else sorted({s for s, _ in agg})
    methods = list(spec["methods"]) if spec.get("methods") else sorted({m for _, m in agg})
    split_methods = sorted({m for _, m in agg} - set(methods))      # runs on several splits: "<method> [split <hash>]"
    if split_methods:
        methods = [m for m in methods if any(k[1] == m for k in agg)] + split_methods
    metrics = spec["metrics"]
    header = ["method"] + [f"{m} ({s})" if len(settings) > 1 else m for s in settings for m in metrics] + ["seeds"]
    lines = [f"# {spec['title']}", "", *[f"{line}  " for line in provenance(command, results)], "",
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
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines) + "\n", buf.getvalue()


def write_table(spec: dict, results: list[dict], results_dir: Path | None, command: str) -> str:
    results = split_rows(results)
    check_comparable(spec, results)
    md, table_csv = markdown(spec, aggregate(results, spec["metrics"]), command, results)
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / f"{spec['name']}.md").write_text(md)
        (results_dir / f"{spec['name']}.csv").write_text(table_csv)
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
    write_table_layout(root, spec["name"], spec["metrics"])
    return write_table(spec, results, results_dir, f"mlml table {root}")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def list_tables(results_dir: Path = Path("results")) -> str:
    """Every table with its profiles: seeds and cost, measured (timing.json) or else as written in the table."""
    lines = []
    for path in sorted(TABLES_DIR.glob("*.toml")):
        spec = read_table(path.stem)
        timing_path = timing_file(results_dir, path.stem)
        timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
        settings, methods = len(spec["settings"]), len(spec["methods"])
        lines.append(f"{path.stem}: {spec['title']} ({plural(settings, 'setting')} x {plural(methods, 'method')} = {plural(settings * methods, 'run')} a seed)")
        for prof, p in spec["profiles"].items():
            cost = measured_cost(timing[prof]) if prof in timing else p.get("cost", "cost not measured")
            lines.append(f"  --profile {prof}: {p.get('seeds', 3)} seeds, {cost}")
    return "\n".join(lines)
