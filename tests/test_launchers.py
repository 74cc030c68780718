"""The SLURM launcher without a cluster: submitit's local executor, and a fake SLURM (tests/fake_slurm.py)
whose sbatch runs the job script on this machine. Both must give the table `--launcher local` gives."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from mlml import cli
from mlml.config import ConfigError
from mlml.experiments import expand, launcher_resources, read_table, reproduce, run_dir, status
from mlml.launchers import SlurmLauncher, SlurmResources, node_command, require, slurm_state
from tests import fake_slurm
from tests.conftest import TINY

submitit = pytest.importorskip("submitit")


def write_table(root):
    tiny = "\n".join(f'"{o}",' for o in TINY)
    (root / "base.toml").write_text("[optim]\nweight_decay = 1e-4\n")
    (root / "tiny.toml").write_text(f"""
title = "tiny"
metrics = ["test/mAP_macro"]
[launcher.slurm]
partition = "cpu"
time_min = 30
[profiles.quick]
config = "base.toml"
seeds = 2
[profiles.quick.launcher.slurm]
cpus_per_task = 1
[settings]
sp = [{tiny} "data.observation=single_positive", "data.n_train=768"]
[methods]
an = ["method.loss=an"]
""")
    return root / "tiny.toml"


@pytest.fixture(scope="module")
def local_table(tmp_path_factory):
    """The tiny table through --launcher local (one thread per run, as the SLURM jobs get)."""
    root = tmp_path_factory.mktemp("local")
    table = write_table(root)
    md = reproduce(str(table), "quick", jobs=os.cpu_count() or 1, runs_dir=root / "runs", results_dir=root / "results")
    return table, numbers(md)


def run_test_metrics(run_directory):
    return {k: v for k, v in json.loads((run_directory / "metrics.json").read_text())["metrics"].items() if k.startswith("test/")}


def numbers(md: str) -> str:
    """The table's rows (the header above holds training times, which differ between reproductions)."""
    return md.split("| method |")[1].strip()


def test_resources_come_from_the_table_then_the_profile_then_flags(local_table):
    table, _ = local_table
    res = launcher_resources(str(table), "quick", ["gpus_per_node=4", "sbatch.qos=high", "mem_gb=64"])
    assert (res.partition, res.time_min, res.cpus_per_task, res.gpus_per_node) == ("cpu", 30, 1, 4)
    params = res.executor_parameters()
    assert params["additional_parameters"] == {"qos": "high"} and params["mem"] == "65536MB" and params["partition"] == "cpu"
    assert res.threads == 0 and SlurmResources(cpus_per_task=32, gpus_per_node=8).threads == 4
    with pytest.raises(ConfigError, match="launcher.slurm.gpus"):
        launcher_resources(str(table), "quick", ["gpus=4"])


def test_node_command_plain_standalone_and_multi_node():
    args = ["train", "--resume"]
    assert node_command(args, 1, 1) == [sys.executable, "-m", "mlml", "train", "--resume"]
    assert "--standalone" in node_command(args, 1, 8) and "--nproc-per-node=8" in node_command(args, 1, 8)
    multi = node_command(args, 4, 8, job_id="1234", head="node7")
    assert "--nnodes=4" in multi and "--rdzv-endpoint=node7:29734" in multi and "--rdzv-id=1234" in multi


def test_scheduler_states_map_to_run_states():
    now = time.time()
    assert [slurm_state(s, now - 10) for s in ("PENDING", "REQUEUED", "RUNNING", "COMPLETING")] == ["pending", "pending", "running", "running"]
    assert [slurm_state(s, now - 10) for s in ("FAILED", "TIMEOUT", "CANCELLED", "COMPLETED", "OUT_OF_MEMORY")] == ["failed"] * 5
    assert slurm_state("UNKNOWN", now - 10) == "pending" and slurm_state("UNKNOWN", now - 3600) == "failed"


def test_sigterm_requeues_a_preempted_job_but_not_a_cancelled_or_already_requeued_one():
    from mlml.launchers import requeue_after_sigterm

    assert requeue_after_sigterm("RUNNING") and requeue_after_sigterm("PREEMPTED") and requeue_after_sigterm("UNKNOWN")
    assert not any(requeue_after_sigterm(s) for s in ("CANCELLED", "REQUEUED", "PENDING"))


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)      # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'mlml\[cluster\]'"):
        require("submitit", "--launcher slurm")


def test_submitit_local_executor_gives_the_local_runs(local_table, tmp_path):
    """One seed (to stay fast): its run's test metrics equal those of the same run launched locally."""
    table, _ = local_table
    launcher = SlurmLauncher(SlurmResources(cpus_per_task=1), poll=0.2, cluster="local")
    reproduce(str(table), "quick", seeds=1, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results", launcher=launcher)
    (ours,) = [run_dir(r) for r in expand(read_table(str(table)), "quick", 1, tmp_path / "runs")]
    local = table.parent / "runs" / ours.relative_to(tmp_path / "runs")
    assert run_test_metrics(ours) == run_test_metrics(local) and len(run_test_metrics(ours)) > 3
    assert (ours / "slurm" / "job.json").exists()


def wait_until(condition, timeout=120.0, poll=0.05):
    start = time.time()
    while not condition():
        assert time.time() - start < timeout, "timed out"
        time.sleep(poll)


def test_fake_slurm_sigterm_requeue_status_and_resubmission_give_the_local_table(local_table, tmp_path, monkeypatch, capsys):
    table, expected = local_table
    monkeypatch.setenv("PATH", f"{fake_slurm.install(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_STATE", str(tmp_path / "slurm"))
    monkeypatch.setenv("PYTHONPATH", os.getcwd())
    runs, results = tmp_path / "runs", tmp_path / "results"
    common = ["reproduce", str(table), "--runs-dir", str(runs), "--results-dir", str(results)]
    first, second = (run_dir(r) for r in expand(read_table(str(table)), "quick", None, runs))

    def states():
        capsys.readouterr()
        assert cli.main([*common, "--status"]) == 0
        lines = capsys.readouterr().out.splitlines()
        return [line.split(": ")[1].split()[0] for line in lines[1:] if not line.startswith("    |")], "\n".join(lines)

    assert states()[0] == ["missing", "missing"]
    # The second run will fail: a corrupt checkpoint that its --resume cannot read.
    (second / "checkpoints").mkdir(parents=True)
    (second / "checkpoints" / "last.pt").write_text("not a checkpoint")
    assert states()[0] == ["missing", "stopped"]
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "hold").touch()                  # the scheduler starts nothing yet
    flags = ["--launcher", "slurm", "--slurm", "checkpoint_every=2", "--poll", "0.2"]
    assert cli.main([*common, *flags, "--no-wait"]) == 0
    assert "submitted or queued" in capsys.readouterr().out
    assert states()[0] == ["pending", "pending"]
    job = json.loads((first / "slurm" / "job.json").read_text())["job_id"]
    assert "#SBATCH --partition=cpu" in (tmp_path / "slurm" / job / "script.sh").read_text()
    (tmp_path / "slurm" / "hold").unlink()

    # Mid-run (a checkpoint written, training going on: 48 steps, a checkpoint every 2), SLURM preempts the first job: SIGTERM.
    wait_until(lambda: states()[0][0] == "running")
    wait_until(lambda: (first / "checkpoints" / "last.pt").exists(), poll=0.01)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    wait_until(lambda: (tmp_path / "slurm" / job / "restarts").read_text() == "1")
    wait_until(lambda: (first / "metrics.json").exists())
    wait_until(lambda: states()[0] == ["done", "failed"])
    shown = states()[1]
    assert "    | " in shown and "RuntimeError" in shown        # the failed run's log tail
    assert json.loads((first / "slurm" / "job.json").read_text())["history"] == [job]    # requeued, not resubmitted
    log = (first / "slurm" / f"{job}_0_log.err").read_text()
    assert "stopped by SIGTERM after optimiser step" in log and "requeueing" in log   # last.pt written, then requeued

    # A second invocation skips the finished run, resubmits the failed one (now readable) and writes the table.
    shutil.rmtree(second / "checkpoints")
    capsys.readouterr()
    assert cli.main([*common, *flags]) == 0
    out, err = capsys.readouterr()
    assert "1 already done, 1 to run" in err and "resubmitted" in err
    assert len(json.loads((second / "slurm" / "job.json").read_text())["history"]) == 2
    assert numbers(out) == expected == numbers((results / "tiny.md").read_text())
    assert states()[0] == ["done", "done"]
