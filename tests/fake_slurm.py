"""A fake SLURM on this machine for the launcher tests: sbatch, srun, sacct, squeue, scancel, scontrol.

`install(tmp_path)` writes one tiny shell script per command into `tmp_path/bin` (each runs this
file) and returns that directory, to be put first on PATH. State lives in `$FAKE_SLURM_STATE/<job id>/`:
`script.sh` (the batch script, copied at submission as SLURM does), `state` (PENDING, RUNNING,
REQUEUED, COMPLETED, FAILED, CANCELLED), `restarts`, and the process ids of the batch shell and the
step. `sbatch` starts a detached supervisor that runs the script (again after `scontrol requeue`,
with the same job id and SLURM_RESTART_COUNT + 1); the job waits while `$FAKE_SLURM_STATE/hold` exists.
`scancel --signal=SIG ID` signals the job step's processes (as SLURM does: not the batch shell);
plain `scancel ID` marks the job CANCELLED and sends SIGTERM to all its processes.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("sbatch", "srun", "sacct", "squeue", "scancel", "scontrol")


def install(root: Path) -> Path:
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" {name} "$@"\n')
        path.chmod(0o755)
    return bin_dir


def state_dir() -> Path:
    return Path(os.environ["FAKE_SLURM_STATE"])


def job_dir(job_id: str) -> Path:
    return state_dir() / job_id


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def new_job_id() -> str:
    root = state_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "counter.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        counter = root / "counter"
        n = int(counter.read_text()) + 1 if counter.exists() else 1000
        counter.write_text(str(n))
    return str(n)


def sbatch(args: list[str]) -> int:
    script = Path(args[-1]).read_text()
    job_id = new_job_id()
    d = job_dir(job_id)
    d.mkdir()
    (d / "script.sh").write_text(script)
    write(d / "restarts", "0")
    write(d / "state", "PENDING")
    subprocess.Popen([sys.executable, __file__, "_supervise", job_id], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {job_id}")
    return 0


def sbatch_option(script: str, name: str) -> str | None:
    match = re.search(rf"^#SBATCH --{name}=(\S+)", script, re.M)
    return match.group(1).strip("'\"") if match else None


def supervise(job_id: str) -> None:
    d = job_dir(job_id)
    script = (d / "script.sh").read_text()
    while (state_dir() / "hold").exists():
        time.sleep(0.05)
    while True:
        restarts = int((d / "restarts").read_text())
        env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0",
                   SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_JOB_NODELIST="localhost", SLURM_RESTART_COUNT=str(restarts))
        output = (sbatch_option(script, "output") or str(d / "batch.log")).replace("%j", job_id)
        write(d / "state", "RUNNING")
        with open(output, "a") as log:
            batch = subprocess.Popen(["bash", str(d / "script.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            write(d / "batch.pid", str(batch.pid))
            code = batch.wait()
        if (d / "cancelled").exists():
            (d / "requeue").unlink(missing_ok=True)
            write(d / "state", "CANCELLED")
            return
        if (d / "requeue").exists():
            (d / "requeue").unlink()
            write(d / "restarts", str(restarts + 1))
            write(d / "state", "REQUEUED")
            time.sleep(0.2)
            continue
        write(d / "state", "COMPLETED" if code == 0 else "FAILED")
        return


def srun(args: list[str]) -> int:
    out = err = None
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            value = args.pop(0)
            out, err = (value, err) if flag == "--output" else (out, value)
    job_id = os.environ["SLURM_JOB_ID"]
    expand = lambda p: p.replace("%j", job_id).replace("%t", "0")   # noqa: E731
    stdout = open(expand(out), "a") if out else None
    stderr = open(expand(err), "a") if err else None
    step = subprocess.Popen(args, stdout=stdout, stderr=stderr, start_new_session=True)
    write(job_dir(job_id) / "step.pid", str(step.pid))
    code = step.wait()
    return code if code >= 0 else 128 - code


def signal_group(pid_file: Path, sig: int) -> None:
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), sig)
        except ProcessLookupError:
            pass


def scancel(args: list[str]) -> int:
    sig = None
    ids = []
    it = iter(args)
    for a in it:
        if a.startswith("--signal="):
            sig = a.split("=", 1)[1]
        elif a in ("--signal", "-s"):
            sig = next(it)
        else:
            ids.append(a)
    for job_id in ids:
        d = job_dir(job_id)
        if sig is None:                  # as SLURM: CANCELLED at once, SIGTERM to every process, later SIGKILL
            (d / "cancelled").touch()
            write(d / "state", "CANCELLED")
            signal_group(d / "step.pid", signal.SIGTERM)
            signal_group(d / "batch.pid", signal.SIGTERM)
        else:
            name = sig if sig.startswith("SIG") else f"SIG{sig}"
            signal_group(d / "step.pid", getattr(signal, name))
    return 0


def scontrol(args: list[str]) -> int:
    if args[:1] == ["requeue"]:
        for job_id in args[1].split(","):
            (job_dir(job_id) / "requeue").touch()
        return 0
    print(f"fake scontrol: unsupported {args}", file=sys.stderr)
    return 1


def known_jobs(args: list[str]) -> list[str]:
    ids = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-j"]
    ids = [j for group in ids for j in group.split(",")]
    return [j for j in ids if (job_dir(j) / "state").exists()]


def sacct(args: list[str]) -> int:
    fields = args[args.index("-o") + 1].split(",") if "-o" in args else ["JobID", "State"]
    if "--noheader" not in args:
        print("|".join(fields))
    for job_id in known_jobs(args):
        values = {"JobID": job_id, "State": (job_dir(job_id) / "state").read_text(), "NodeList": "localhost"}
        print("|".join(values.get(f, "") for f in fields))
    return 0


def squeue(args: list[str]) -> int:
    for job_id in known_jobs(args):
        state = (job_dir(job_id) / "state").read_text()
        if state in ("PENDING", "RUNNING", "REQUEUED"):
            print(f"{job_id} {state}")
    return 0


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "_supervise":
        supervise(args[0])
        return 0
    return {"sbatch": sbatch, "srun": srun, "sacct": sacct, "squeue": squeue, "scancel": scancel, "scontrol": scontrol}[command](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
