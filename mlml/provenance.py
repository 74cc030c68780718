"""Where a run came from: commit, package versions and hardware, recorded in every `metrics.json`.

Tables take their provenance from their runs, not from the machine that assembles them, so a table
rebuilt elsewhere (`mlml table`, or `mlml reproduce` over runs made on another machine) still
names the commit and hardware that produced its numbers.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        return found.group(1).strip() if found else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def cpu_bf16_units() -> str:
    """The CPU's bf16 instructions as /proc/cpuinfo names them (avx512_bf16, amx_bf16); '' if none or unknown.

    They decide whether `optim.amp = "on"` (bf16 autocast) speeds up training on the CPU or slows it.
    """
    try:
        flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        return ""
    present = flags.group(1).split() if flags else []
    return " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in present)


def hardware() -> str:
    """e.g. 'x86_64, 2 CPU cores (Intel(R) Xeon(R) Processor; amx_bf16), no GPU'."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cpu = "; ".join(x for x in (cpu_model(), cpu_bf16_units()) if x)
    return f"{platform.machine()}, {os.cpu_count()} CPU cores" + (f" ({cpu})" if cpu else "") + f", {gpu}"


def git_commit(checkout: Path | None = None) -> str:
    """Short commit of the mlml checkout that runs, wherever the command is started from ('+ uncommitted
    changes' if a tracked file outside `results/` differs: tables that `mlml reproduce` rewrites there
    are outputs, not code); `MLML_COMMIT` overrides it for a copy of the tree whose .git, if any, is not
    its own (e.g. on a remote machine)."""
    if os.environ.get("MLML_COMMIT"):
        return os.environ["MLML_COMMIT"]
    here = checkout or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=here).stdout
    dirty = [line for line in status.splitlines() if not line[3:].startswith("results/")]   # paths from the top
    return commit + (" (with uncommitted changes)" if dirty else "")


def versions() -> str:
    import numpy
    import torch

    return f"Python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}"


def packages() -> dict[str, str]:
    """Python's and the installed versions of the packages a run's numbers depend on."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("mlml", "torch", "torchvision", "numpy", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment() -> dict:
    """What `metrics.json` records under "provenance"."""
    return {"commit": git_commit(), "versions": versions(), "packages": packages(), "hardware": hardware()}
