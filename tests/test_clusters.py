"""The cluster launchers run for real: launch/slurm.sbatch on a one-node SLURM cluster, and
launch/tpu_vm.sh against a stand-in `gcloud` that records what it is asked to do."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
from slurm_cluster import SlurmCluster, missing_binaries
from test_fault_tolerance import assert_ends_as_unbroken, cli, metric_rows, tiny_config

from jaxlm import train as train_lib

SBATCH = "launch/slurm.sbatch"


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A real one-node SLURM cluster (tests/slurm_cluster.py), up for this module's tests.

    Where SLURM is not installed the tests that use it are skipped with the reason, unless
    JAXLM_REQUIRE_SLURM=1 (.ci/run sets it, after installing SLURM): then they fail.
    """
    problem = None
    if missing := missing_binaries():
        problem = (
            f"SLURM binaries not found: {', '.join(missing)} "
            "(apt-get install slurmctld slurmd slurm-client munge)"
        )
    elif os.geteuid() != 0:
        problem = "slurmd must run as root to start jobs; run the SLURM tests as root"
    if problem:
        if os.environ.get("JAXLM_REQUIRE_SLURM") == "1":
            pytest.fail(f"JAXLM_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(f"{problem}; set JAXLM_REQUIRE_SLURM=1 to make this a failure")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


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
    slurm_cluster, tmp_path, repo, tokenizer_path
):
    """`sbatch --ntasks=2 launch/slurm.sbatch ...` trains with 2 processes (gloo), takes the
    SIGTERM a preempting cluster sends, saves, requeues itself and resumes: its per-step
    losses and final parameters equal, bit for bit, those of one unbroken 1-process run."""
    steps = 10  # the SIGTERM after step 3 lands with steps to go, however slow the machine
    # The reference: one process with the 2 devices the 2 SLURM tasks have between them.
    reference = subprocess.Popen(
        cli(tokenizer_path, tmp_path / "unbroken", steps, every=1000),
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**_job_env(repo), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )

    workdir = tmp_path / "slurm-run"
    job = slurm_cluster.sbatch(
        "--ntasks=2",
        repo / SBATCH,
        *cli(tokenizer_path, workdir, steps, every=1000)[3:],
        cwd=tmp_path,
        env=_job_env(repo),
    )
    log = tmp_path / f"slurm-{job}.out"  # SLURM's default: in the submit directory
    _wait_for_line(log, r"^0: step 3/", slurm_cluster, job)
    # Without --batch: to the job's steps (the srun tasks), as --signal=TERM@N is sent.
    slurm_cluster.scancel("--signal=TERM", job)
    _wait_for_line(log, r"^requeueing|^preempted", slurm_cluster, job)
    assert slurm_cluster.wait(job, states=("PENDING",), timeout=120)["Restarts"] == "1"
    # Skip SLURM's 2 minute hold, but not by less than a second: slurmd refuses a run whose
    # credential dates from the second its previous run was revoked in ("Job credential
    # revoked", seen here when the update followed the requeue within the same second).
    time.sleep(2)
    slurm_cluster.scontrol("update", f"JobId={job}", "StartTime=now")
    final = slurm_cluster.wait(job, timeout=400)
    output = log.read_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", (final, output[-3000:])
    assert final["Requeue"] == "1"  # #SBATCH --requeue
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


def test_sigterm_before_the_first_step_saves_after_it(tmp_path, tokenizer_path, monkeypatch):
    """A SIGTERM that comes while the run loads data, restores or compiles (SLURM's
    --signal=TERM@N soon after a start, a preemption at any moment) is not lost: the run
    saves after its first step and stops as preempted."""
    build, escaped = train_lib.pipeline.build, []

    def build_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # to this process, while the run sets up
        return build(*args, **kwargs)

    def outside_handler(signum, frame):  # what SIGTERM would do had jaxlm not caught it yet
        escaped.append(signum)

    monkeypatch.setattr(train_lib.pipeline, "build", build_then_sigterm)
    previous = signal.signal(signal.SIGTERM, outside_handler)
    try:
        with pytest.raises(train_lib.Preempted, match="checkpoint saved at step 1"):
            train_lib.train(tiny_config(tokenizer_path, 4), tmp_path)
        assert signal.getsignal(signal.SIGTERM) is outside_handler  # put back as it was
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert escaped == []
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


FAKE_GCLOUD = """#!{python}
# Records its arguments; `describe` answers as gcloud would; `ssh --worker=all --command C`
# runs C with sh on 2 stand-in workers (each its own HOME), as a TPU VM's login shell does.
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_RECORD"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if "describe" in args:
    print("ACTIVE" if "queued-resources" in args else "10.0.0.7")
elif "ssh" in args:
    name, command = args[args.index("ssh") + 1], args[args.index("--command") + 1]
    status = 0
    for worker in range(2):
        home = os.path.join(os.environ["FAKE_WORKERS"], name, str(worker))
        os.makedirs(home, exist_ok=True)
        env = {{**os.environ, "HOME": home, "FAKE_WORKER": f"{{name}}/{{worker}}"}}
        status = subprocess.run(["sh", "-c", command], cwd=home, env=env).returncode or status
    sys.exit(status)
"""

FAKE_PYTHON = """#!{python}
# `python -m jaxlm.train ...` on a stand-in worker: records what it was given.
import json, os, sys
with open(os.path.join(os.environ["HOME"], "train.json"), "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items()
                                             if k.startswith(("JAXLM", "MEGASCALE"))}}}}, f)
print("step 1/1 on", os.environ["FAKE_WORKER"])
sys.exit(3 if os.environ["FAKE_WORKER"] == os.environ.get("FAKE_FAIL") else 0)
"""

STUBS = {
    "git": '[ "$1" = clone ] && mkdir -p jaxlm; exit 0',  # clone, fetch, checkout
    "python3": "mkdir -p .venv/bin && : > .venv/bin/activate",  # python3 -m venv .venv
    "pip": "exit 0",
}

# Train arguments a shell would mangle if the script quoted them wrong.
TRICKY = [
    "--config=configs/tiny.py",
    "--workdir=/mnt/runs/a b",
    '--config.name=it\'s "q" $HOME `x` \\ ;',
]


def _tpu_vm(tmp_path, repo, *flags, **settings):
    """Run launch/tpu_vm.sh with the stand-ins on PATH; returns the result and the gcloud
    argument lists it recorded."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scripts = {
        "gcloud": FAKE_GCLOUD.format(python=sys.executable),
        "python": FAKE_PYTHON.format(python=sys.executable),
        **{name: f"#!/bin/sh\n{body}\n" for name, body in STUBS.items()},
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "gcloud.jsonl"
    # Variables the test's own environment has (CI exports JAXLM_REQUIRE_SLURM) would read as
    # ones the script passed on.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("JAXLM", "MEGASCALE"))}
    env = {
        **inherited,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "GCLOUD_RECORD": str(record),
        "FAKE_WORKERS": str(tmp_path / "workers"),
        "TPU": "my-v5p",
        "ZONE": "us-east5-a",
        "REPO": "https://example.com/jaxlm.git",
        "REF": "abc123",
        **settings,
    }
    result = subprocess.run(
        ["bash", repo / "launch/tpu_vm.sh", *flags],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    calls = (
        [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    )
    return result, calls


def _replay(dry_run_output: str) -> list[list[str]]:
    """The gcloud arguments of each printed line, pasted into bash."""
    lines = "".join(
        line[2:] + "\n" for line in dry_run_output.splitlines() if line.startswith("+ ")
    )
    replay = subprocess.run(
        [
            "bash",
            "-c",
            'gcloud() { "$0" -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@"; }\n'
            + lines,
            sys.executable,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in replay.stdout.splitlines()]


def test_tpu_vm_dry_run_prints_every_gcloud_command_and_runs_none(tmp_path, repo):
    result, calls = _tpu_vm(
        tmp_path,
        repo,
        "--dry_run",
        *TRICKY,
        ACCELERATOR="v5p-128",
        RUNTIME="v2-alpha-tpuv5",
        NUM_SLICES="2",
        DELETE_AFTER="1",
    )
    assert result.returncode == 0, result.stderr
    assert calls == []
    printed = [["gcloud", *c] for c in _replay(result.stdout)]
    assert [c[:4] for c in printed] == [
        ["gcloud", "compute", "tpus", "queued-resources"],  # create
        ["gcloud", "compute", "tpus", "queued-resources"],  # its state, polled
        ["gcloud", "compute", "tpus", "tpu-vm"],  # worker 0's address
        ["gcloud", "compute", "tpus", "tpu-vm"],
        ["gcloud", "compute", "tpus", "tpu-vm"],  # start
        ["gcloud", "compute", "tpus", "tpu-vm"],
        ["gcloud", "compute", "tpus", "tpu-vm"],  # stop
        ["gcloud", "compute", "tpus", "queued-resources"],
    ]  # delete
    create = printed[0]
    assert create[4:6] == ["create", "my-v5p"]
    assert {
        "--zone=us-east5-a",
        "--node-count=2",
        "--node-prefix=my-v5p",
        "--accelerator-type=v5p-128",
        "--runtime-version=v2-alpha-tpuv5",
    } <= set(create)
    starts = printed[3:5]
    assert [c[4:6] for c in starts] == [["ssh", "my-v5p-0"], ["ssh", "my-v5p-1"]]
    assert all("--worker=all" in c and "--zone=us-east5-a" in c for c in printed[3:7])
    assert printed[7][4:6] == ["delete", "my-v5p"]


def test_tpu_vm_starts_every_worker_with_the_arguments_as_typed(tmp_path, repo):
    dry_run, _ = _tpu_vm(tmp_path, repo, "--dry_run", *TRICKY, NUM_SLICES="2", RUN_ID="r1")
    result, calls = _tpu_vm(tmp_path, repo, *TRICKY, NUM_SLICES="2", RUN_ID="r1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls[0][:5] == ["compute", "tpus", "tpu-vm", "describe", "my-v5p-0"]
    starts = sorted(calls[1:], key=lambda c: c[4])
    assert [c[3:5] for c in starts] == [["ssh", "my-v5p-0"], ["ssh", "my-v5p-1"]]
    assert all("--worker=all" in c and "--zone=us-east5-a" in c for c in starts)
    # What the dry run printed is what ran (but the address, unknown before it is asked for).
    printed = [
        [a.replace("COORDINATOR_IP", "10.0.0.7") for a in c] for c in _replay(dry_run.stdout)
    ]
    assert printed[:3] == [calls[0], *starts]
    for slice_id in (0, 1):
        for worker in (0, 1):
            got = json.loads(
                (tmp_path / f"workers/my-v5p-{slice_id}/{worker}/train.json").read_text()
            )
            assert got["argv"] == ["-m", "jaxlm.train", *TRICKY]
            assert got["env"] == {
                "JAXLM_DISTRIBUTED": "1",
                "MEGASCALE_NUM_SLICES": "2",
                "MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.7:8080",
                "MEGASCALE_SLICE_ID": str(slice_id),
            }
            logs = list((tmp_path / f"workers/my-v5p-{slice_id}/{worker}/jaxlm-logs").glob("*.log"))
            assert len(logs) == 1 and f"on my-v5p-{slice_id}/{worker}" in logs[0].read_text()
    # Each slice's stream (all its workers) is kept here too.
    local = {
        p.name.removesuffix("-r1.log"): p.read_text() for p in (tmp_path / "logs/tpu_vm").iterdir()
    }
    assert "step 1/1 on my-v5p-1/0" in local["my-v5p-1"] and "on my-v5p-1/1" in local["my-v5p-1"]


def test_tpu_vm_failed_worker_stops_every_worker_and_reports_it(tmp_path, repo):
    result, calls = _tpu_vm(
        tmp_path,
        repo,
        *TRICKY,
        NUM_SLICES="2",
        FAKE_FAIL="my-v5p-1/1",
        ACCELERATOR="v5p-128",
        RUNTIME="v2-alpha-tpuv5",
        DELETE_AFTER="1",
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "a slice failed (exit 3): stopping the training process on every worker" in result.stdout
    stops = [c for c in calls if "ssh" in c and "kill -TERM" in c[c.index("--command") + 1]]
    assert sorted(c[4] for c in stops) == ["my-v5p-0", "my-v5p-1"]
    assert all("--worker=all" in c for c in stops)
    assert calls[-1][:5] == ["compute", "tpus", "queued-resources", "delete", "my-v5p"]
