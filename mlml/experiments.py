"""Tables as experiments: expand a table's settings x methods x seeds, run what is missing, and
build Markdown/CSV tables from the runs' `metrics.json` files (never from logs).

A table is a TOML file in `experiments/tables/`:

    title = "..."
    metrics = ["test/mAP_macro", "test/f1_macro_calibrated"]
    [profiles.quick]                    # and [profiles.full]
    config = "../configs/quick.toml"    # relative to the table file
    seeds = 3
    cost = "about 6 min on 2 CPU cores"
    [settings]                          # setting name -> config overrides
    single_positive = ["data.observation=single_positive"]
    [methods]                           # method name -> config overrides
    an = ["method.loss=an"]
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mlml.config import ConfigError, load_config
from mlml.trainer import run_dir_for

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


def run_dir(run: Run) -> Path:
    return run_dir_for(load_config(run.config, list(run.overrides)))


def launch(run: Run, threads: int) -> None:
    """Train one run in a subprocess (resuming its last checkpoint if it was interrupted)."""
    cmd = [sys.executable, "-m", "mlml", "train", "--config", str(run.config), "--resume"]
    for o in (*run.overrides, f"run.threads={threads}", "run.progress=false"):
        cmd += ["--set", o]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run {run.setting}/{run.method}/seed{run.seed} failed:\n{done.stderr[-3000:]}")


def reproduce(name: str, profile: str, seeds: int | None = None, jobs: int = 1, runs_dir: Path = Path("runs"), results_dir: Path = Path("results")) -> str:
    """Run every missing run of a table, then rebuild and return its Markdown table."""
    spec = read_table(name)
    runs = expand(spec, profile, seeds, runs_dir)
    todo = [r for r in runs if not (run_dir(r) / "metrics.json").exists()]
    print(f"{name} ({profile}): {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run", file=sys.stderr)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for i, _ in enumerate(pool.map(lambda r: launch(r, threads), todo)):
            print(f"  finished {i + 1}/{len(todo)}", file=sys.stderr)
    command = f"mlml reproduce {name} --profile {profile}" + (f" --seeds {seeds}" if seeds else "")
    return write_table(spec, collect(runs_dir / name), results_dir, command)


def collect(root: Path) -> list[dict]:
    """Every `metrics.json` below `root`."""
    return [json.loads(p.read_text()) for p in sorted(root.rglob("metrics.json"))]


def git_commit() -> str:
    """Short commit of the working tree ('+ uncommitted changes' if dirty); `MLML_COMMIT` overrides it
    for a copy of the tree whose .git, if any, is not its own (e.g. on a remote machine)."""
    if os.environ.get("MLML_COMMIT"):
        return os.environ["MLML_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    return commit + (" (with uncommitted changes)" if dirty else "")


def provenance(command: str) -> list[str]:
    import numpy
    import torch

    commit = git_commit()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return [
        f"Command: `{command}`",
        f"Commit: {commit}; Python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}",
        f"Hardware: {platform.machine()}, {os.cpu_count()} CPU cores, {gpu}",
    ]


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


def markdown(spec: dict, agg: dict, command: str) -> tuple[str, str]:
    settings = list(spec["settings"]) if spec.get("settings") else sorted({s for s, _ in agg})
    methods = list(spec["methods"]) if spec.get("methods") else sorted({m for _, m in agg})
    metrics = spec["metrics"]
    header = ["method"] + [f"{m} ({s})" if len(settings) > 1 else m for s in settings for m in metrics] + ["seeds"]
    lines = [f"# {spec['title']}", "", *[f"{line}  " for line in provenance(command)], "",
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
    md, table_csv = markdown(spec, aggregate(results, spec["metrics"]), command)
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / f"{spec['name']}.md").write_text(md)
        (results_dir / f"{spec['name']}.csv").write_text(table_csv)
    return md


def table_from_runs(root: Path, results_dir: Path | None = None) -> str:
    """Rebuild a table from existing runs; uses the table file named like the directory if there is one."""
    results = collect(root)
    if not results:
        raise FileNotFoundError(f"no metrics.json below {root}")
    name = results[0]["experiment"]
    try:
        spec = read_table(name)
    except ConfigError:
        spec = {"name": name, "title": name, "metrics": ["test/mAP_macro"], "settings": {}, "methods": {}}
    return write_table(spec, results, results_dir, f"mlml table {root}")


def list_tables() -> str:
    lines = []
    for path in sorted(TABLES_DIR.glob("*.toml")):
        spec = read_table(path.stem)
        n = len(spec["settings"]) * len(spec["methods"])
        lines.append(f"{path.stem}: {spec['title']} ({n} settings x methods)")
        for prof, p in spec["profiles"].items():
            lines.append(f"  --profile {prof}: {p.get('seeds', 3)} seeds, {p.get('cost', 'cost not measured')}")
    return "\n".join(lines)
