"""The cluster launchers run for real: launch/slurm.sbatch on a one-node SLURM cluster, and
launch/tpu_vm.sh against a stand-in `gcloud` that records what it is asked to do."""

import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from test_fault_tolerance import assert_ends_as_unbroken, cli, metric_rows, tiny_config

SBATCH = "launch/slurm.sbatch"


def _job_env(repo) -> dict:
    """What a user's submitting shell has: the venv (JAXLM_VENV), the checkout (JAXLM_DIR);
    no simulated-device flags, so each SLURM task is one process with one CPU device."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAXLM_DIR=str(repo), PYTHONUNBUFFERED="1")
    if sys.prefix != sys.base_prefix:
        env["JAXLM_VENV"] = sys.prefix
    else:
        env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _wait_for_line(path: pathlib.Path, pattern: str, cluster, job_id, timeout=400) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if re.search(pattern, text, re.MULTILINE):
            return text
        state = cluster.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job_id} {state}:\n{text[-3000:]}"
        time.sleep(0.2)
    raise TimeoutError(f"no line matching {pattern!r} in {path} after {timeout} s")


@pytest.mark.slow  # a SLURM cluster and 3 training processes
def test_sbatch_two_tasks_preempted_requeued_ends_as_one_process_run(
        slurm_cluster, tmp_path, repo, tokenizer_path):
    """`sbatch --ntasks=2 launch/slurm.sbatch ...` trains with 2 processes (gloo), takes the
    SIGTERM a preempting cluster sends, saves, requeues itself and resumes: its per-step
    losses and final parameters equal, bit for bit, those of one unbroken 1-process run."""
    steps = 6
    # The reference: one process with the 2 devices the 2 SLURM tasks have between them.
    reference = subprocess.Popen(
        cli(tokenizer_path, tmp_path / "unbroken", steps, every=1000), cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**_job_env(repo), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})

    workdir = tmp_path / "slurm-run"
    job = slurm_cluster.sbatch("--ntasks=2", repo / SBATCH,
                               *cli(tokenizer_path, workdir, steps, every=1000)[3:],
                               cwd=tmp_path, env=_job_env(repo))
    log = tmp_path / f"slurm-{job}.out"  # SLURM's default: in the submit directory
    _wait_for_line(log, r"^0: step 3/", slurm_cluster, job)
    # Without --batch: to the job's steps (the srun tasks), as --signal=TERM@N is sent.
    slurm_cluster.scancel("--signal=TERM", job)
    _wait_for_line(log, r"^requeueing|^preempted", slurm_cluster, job)
    deadline = time.monotonic() + 120
    while (state := slurm_cluster.job(job))["JobState"] != "PENDING" or state["Restarts"] == "0":
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    slurm_cluster.scontrol("update", f"JobId={job}", "StartTime=now")  # skip SLURM's 2 min wait
    final = slurm_cluster.wait(job, timeout=400)
    output = log.read_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", output[-3000:]
    saved = int(re.search(r"^0: .*checkpoint saved at step (\d+)", output, re.MULTILINE)[1])
    assert 3 <= saved < steps
    assert "preempted: checkpoint saved; requeueing" in output
    assert "restart 1)" in output
    assert f"resumed from {workdir / 'checkpoints' / str(saved)}" in output
    assert "2 tasks on" in output and "1: [Gloo] Rank 1" in output

    out, _ = reference.communicate(timeout=400)
    assert reference.returncode == 0, out[-3000:]
    assert_ends_as_unbroken(tmp_path, workdir, steps, tiny_config(tokenizer_path, steps))
    assert len(metric_rows(workdir)) == len(metric_rows(tmp_path / "unbroken"))
