"""What every benchmark of the suite shares: A/B rounds, medians and ranges, the machine, results files.

A figure of the suite is a ratio against a baseline measured in the same process in the same run:
`ab_rounds` alternates the two (A B, B A, A B, ...) over several rounds, so that load from other
processes on a shared machine falls on both sides, and reports the median ratio with its range.
`machine()` describes where it ran (CPU model, cores, threads, load average, versions, GPU), and
`write_results` writes `benchmarks/results/<machine>.json` and `.md`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Union

import torch

from mlml.provenance import cpu_model

Rates = Union[float, dict]
RESULTS = Path(__file__).resolve().parent / "results"


def summary(values: list[float]) -> dict:
    """Median, min and max of a list of measurements (and the values themselves)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": [round(v, 4) for v in values]}


def ab_rounds(a: Callable[[], Rates], b: Callable[[], Rates], rounds: int) -> dict:
    """Alternate `a()` and `b()` over `rounds` rounds; each returns a rate (higher = faster) or a dict
    of named rates (e.g. per wall second and per CPU second of this process).

    Round r runs a then b when r is even, b then a when odd. Returns the summaries of both rates
    and of their per-round ratio a / b (the figure: > 1 means a is faster than its baseline b),
    keyed like the rates ("a", "b", "ratio" for a plain rate; "a_cpu", "ratio_cpu", ... for a dict
    {"": wall, "cpu": cpu}).
    """
    ra, rb = [], []
    for r in range(rounds):
        if r % 2 == 0:
            ra.append(a()); rb.append(b())
        else:
            rb.append(b()); ra.append(a())
    as_dict = (lambda x: x if isinstance(x, dict) else {"": x})
    ra, rb = [as_dict(x) for x in ra], [as_dict(x) for x in rb]
    out = {}
    for key in ra[0]:
        tag = f"_{key}" if key else ""
        xa, xb = [x[key] for x in ra], [x[key] for x in rb]
        out |= {f"a{tag}": summary(xa), f"b{tag}": summary(xb), f"ratio{tag}": summary([x / y for x, y in zip(xa, xb)])}
    return out


class Clock:
    """Wall and process-CPU seconds since `start()`: `rates(n)` -> {"": n / wall, "cpu": n / cpu}.

    On a machine shared with other processes the CPU time of a single-threaded, single-process
    measurement is disturbed far less than the wall time (others take whole time slices, not
    cycles of ours); both are reported.
    """

    def start(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def rates(self, n: float) -> dict[str, float]:
        return {"": n / (time.perf_counter() - self.wall), "cpu": n / (time.process_time() - self.cpu)}


def timed(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    """Seconds `fn()` takes (after `sync()`, for asynchronous devices)."""
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def machine() -> dict:
    """Where the figures were measured: CPU, cores, memory, load, versions, GPU."""
    mem = 0.0
    try:
        found = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
        mem = int(found.group(1)) / 2**20 if found else 0.0
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {
        "name": machine_name(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(mem, 1),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def machine_name() -> str:
    """A file name for this kind of machine: `<gpu or cpu>-<cores>c`, e.g. `cpu-2c`, `h100-16c`."""
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0).lower()
        found = re.search(r"(a100|h100|h200|l40s?|a10g?|v100|t4|rtx\s*\d+|b200)", gpu)
        kind = (found.group(1) if found else "gpu").replace(" ", "")
    else:
        kind = "cpu"
    return f"{kind}-{os.cpu_count()}c"


def write_results(results: dict, markdown: str, name: str | None = None) -> tuple[Path, Path]:
    """Write `results/<name>.json` and `results/<name>.md` (name: the machine's)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = name or machine_name()
    js, md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    js.write_text(json.dumps(results, indent=2, default=float) + "\n")
    md.write_text(markdown)
    return js, md


def fmt_ratio(s: dict, digits: int = 2) -> str:
    """'0.97 (0.95-0.99)': median and range."""
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"
