"""Kill jaxlm at any moment and lose nothing: exact resume, preemption, bad checkpoints, NaNs."""

import contextlib
import json
import os
import pathlib
import random
import selectors
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import logging as absl_logging
from support import factory_for, small_config, tensorboard_view

from configs import tiny
from jaxlm import checkpoint as checkpoint_lib
from jaxlm import metrics as metrics_lib
from jaxlm import stop_signals
from jaxlm import train as train_lib


def tiny_config(tokenizer_path, steps, every=2, log_every=1):
    c = tiny.get_config()
    c.data.tokenizer, c.data.seq_len = tokenizer_path, 64
    c.train.steps, c.train.warmup_steps, c.train.log_every = steps, 1, log_every
    c.checkpoint.every = every
    return c


def cli(tokenizer_path, workdir, steps, every=2, log_every=1):
    return [
        sys.executable,
        "-m",
        "jaxlm.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        "--config.train.warmup_steps=1",
        f"--config.train.log_every={log_every}",
        "--config.data.seq_len=64",
        f"--config.checkpoint.every={every}",
        f"--config.data.tokenizer={tokenizer_path}",
    ]


def final_params(workdir, steps, config):
    checkpoints = checkpoint_lib.Checkpointer(
        pathlib.Path(workdir) / "checkpoints", keep=3, probe=False
    )
    assert checkpoints.latest_step() == steps
    factory = factory_for(config)
    state, meta = checkpoints.restore(steps, factory.trained(factory.abstract))  # LoRA: adapters
    checkpoints.close()
    return jax.device_get(state["params"]), meta


def metric_rows(workdir):
    return [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]


def deterministic(rows):
    """Metric rows without the fields that time the run."""
    return [
        {k: v for k, v in row.items() if k not in metrics_lib.WALL_CLOCK_FIELDS} for row in rows
    ]


def finished_checkpoints(workdir):
    directory = pathlib.Path(workdir) / "checkpoints"
    return (
        sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
        if directory.is_dir()
        else []
    )


def run_until(command, cwd, pattern=None, delay=0.0, timeout=300):
    """Start `command`; SIGKILL it `delay` s after a stdout line containing `pattern` appears.

    Returns the exit code and the output; with no pattern, runs to the end.
    """
    process = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    output, deadline, kill_at = [], time.monotonic() + timeout, None
    while process.poll() is None and time.monotonic() < deadline:
        if kill_at is not None and time.monotonic() >= kill_at:
            process.send_signal(signal.SIGKILL)
            break
        if selector.select(timeout=0.01):
            line = process.stdout.readline()
            output.append(line)
            if pattern and kill_at is None and pattern in line:
                kill_at = time.monotonic() + delay
    rest, _ = process.communicate(timeout=60)
    return process.returncode, "".join(output) + rest


@pytest.mark.slow  # other processes
def test_killed_at_random_moments_resumes_exactly(tmp_path, repo, tokenizer_path):
    # A row every 3 steps, a checkpoint every 2: most checkpoints fall inside a logging
    # window, whose losses the resumed run must carry on from.
    steps, every, log_every = 10, 2, 3
    config = tiny_config(tokenizer_path, steps, every, log_every)
    train_lib.train(config, tmp_path / "unbroken")

    # Each pattern is a line the run reaches with steps still to go, so every kill lands
    # while it trains; the delays after it are random.
    rng = random.Random(1234)
    workdir = tmp_path / "killed"
    kills = [
        ("saving checkpoint", 0.1),  # in the middle of the first async save
        ("step 4/10 | saving", rng.uniform(0.0, 0.3)),  # after checkpoint 4: window [4]
        ("step 9/10 | loss", 0.0),
    ]  # row 9 written, checkpoint 10 not yet
    killed_mid_save = stale_rows = 0
    for pattern, delay in kills:
        code, output = run_until(
            cli(tokenizer_path, workdir, steps, every, log_every), repo, pattern, delay
        )
        assert code == -signal.SIGKILL, output[-2000:]
        killed_mid_save += any((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
        newest = max(finished_checkpoints(workdir), default=0)
        stale_rows += any(r["step"] > newest for r in metric_rows(workdir))
    assert killed_mid_save >= 1  # at least one kill really landed inside a save
    assert stale_rows >= 1  # and one after a row the resumed run logs again
    code, output = run_until(cli(tokenizer_path, workdir, steps, every, log_every), repo)
    assert code == 0, output[-3000:]
    assert "resumed from" in output

    rows = assert_ends_as_unbroken(tmp_path, workdir, steps, config)
    assert [r["step"] for r in rows if "loss" in r] == [3, 6, 9, 10]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, steps]


def assert_ends_as_unbroken(tmp_path, workdir, steps, config, microbatches=None):
    """The resumed run in `workdir` ends as the one in tmp_path/unbroken: the same final
    params bit for bit, its data position at `microbatches` (default `steps`), and the same
    metric rows in
    metrics.jsonl and TensorBoard, row for row and bit for bit, but for the wall-clock
    fields. Returns the resumed run's metric rows."""
    expected, _ = final_params(tmp_path / "unbroken", steps, config)
    actual, meta = final_params(workdir, steps, config)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
        np.testing.assert_array_equal(a, b)
    assert meta["data"]["iterator"] == {"next_index": microbatches or steps}
    rows = metric_rows(workdir)
    assert deterministic(rows) == deterministic(metric_rows(tmp_path / "unbroken"))

    def board(run):
        return [
            (tag, step, value)
            for tag, step, value in tensorboard_view(run / "tensorboard")
            if tag not in metrics_lib.WALL_CLOCK_FIELDS
        ]

    assert board(workdir) == board(tmp_path / "unbroken")
    return rows


SCHEDULE = ((0, 16), (4, 32), (6, 64))  # steps 1-4 rows of 16, 5-6 of 32, 7-8 of 64


@pytest.mark.slow  # other processes
def test_killed_in_and_across_seq_len_stages_resumes_exactly(tmp_path, repo, tokenizer_path):
    steps = 8
    config = tiny_config(tokenizer_path, steps, every=3)  # checkpoints 3, 6 and 8
    config.data.seq_len_schedule = SCHEDULE
    train_lib.train(config, tmp_path / "unbroken")

    workdir = tmp_path / "killed"
    command = [
        *cli(tokenizer_path, workdir, steps, every=3),
        f"--config.data.seq_len_schedule={SCHEDULE}",
    ]
    # Killed in stage 2 (the newest checkpoint, 3, is in stage 1), then in stage 3 (checkpoint
    # 6 ends stage 2): the first resume starts inside stage 1 and crosses into stage 2 again,
    # the second starts right at stage 3. Compiling a new stage gives the saves time to finish.
    outputs = []
    for pattern in ("step 5/8 | loss", "step 7/8 | loss", None):
        code, output = run_until(command, repo, pattern)
        assert code == (-signal.SIGKILL if pattern else 0), output[-3000:]
        outputs.append(output)
    checkpoints = workdir / "checkpoints"
    assert f"resumed from {checkpoints / '3'}" in outputs[1]
    assert "step 4/8 | seq_len stage 1/3 continues: 32 rows of 16" in outputs[1]
    assert "step 5/8 | seq_len stage 2/3 starts: 16 rows of 32" in outputs[1]
    assert f"resumed from {checkpoints / '6'}" in outputs[2]
    assert "step 7/8 | seq_len stage 3/3 starts: 8 rows of 64" in outputs[2]

    rows = assert_ends_as_unbroken(tmp_path, workdir, steps, config)
    stage_rows = [(r["step"], r["seq_len"]) for r in rows if "seq_len" in r]
    assert stage_rows == [(1, 16), (5, 32), (7, 64)]


def _signalled_at_step_3(tokenizer_path, workdir, repo, signum) -> str:
    """A 200-step run sent `signum` once it prints step 3; its output. It must exit as
    preempted."""
    process = subprocess.Popen(
        cli(tokenizer_path, workdir, 200, every=1000),
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in process.stdout:
        if line.startswith("step 3/"):
            process.send_signal(signum)
            break
    output = process.communicate(timeout=300)[0]
    assert process.returncode == train_lib.PREEMPTED_EXIT_CODE, output[-2000:]
    return output


@pytest.mark.slow  # other processes
def test_sigterm_checkpoints_and_exits_then_resumes(tmp_path, repo, tokenizer_path):
    workdir = tmp_path / "run"
    output = _signalled_at_step_3(tokenizer_path, workdir, repo, signal.SIGTERM)
    checkpoints = sorted(
        int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert len(checkpoints) == 1 and 3 <= checkpoints[0] < 200
    saved = checkpoints[0]
    assert f"checkpoint saved at step {saved}" in output
    assert [r["step"] for r in metric_rows(workdir) if "loss" in r][-1] == saved

    code, output = run_until(cli(tokenizer_path, workdir, saved + 2, every=1000), repo)
    assert code == 0, output[-2000:]
    assert f"resumed from {workdir / 'checkpoints' / str(saved)}" in output
    assert [r["step"] for r in metric_rows(workdir) if "loss" in r] == list(range(1, saved + 3))


@pytest.mark.slow  # a subprocess
def test_ctrl_c_saves_and_exits_in_one_line(tmp_path, repo, tokenizer_path):
    workdir = tmp_path / "run"
    output = _signalled_at_step_3(tokenizer_path, workdir, repo, signal.SIGINT)
    assert "Traceback" not in output, output[-4000:]
    saved = finished_checkpoints(workdir)
    assert len(saved) == 1 and 3 <= saved[0] < 200
    assert "Ctrl-C: saving a checkpoint at the next step boundary" in output
    assert f"checkpoint saved at step {saved[0]}; start the same command again" in output


def test_a_second_ctrl_c_is_python_s_own_again(capfd):
    before = signal.getsignal(signal.SIGINT)
    stop = stop_signals.StopRequest()
    try:
        assert signal.getsignal(signal.SIGINT) is not before and not stop.agreed()
        os.kill(os.getpid(), signal.SIGINT)  # the first: a request to save and stop
        assert stop.agreed()
        assert signal.getsignal(signal.SIGINT) is before  # the next one interrupts at once
        assert "Ctrl-C: saving a checkpoint" in capfd.readouterr().err
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def _corrupt(step_dir: pathlib.Path):
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 8:
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)


def test_corrupt_or_incomplete_newest_checkpoint_falls_back(tmp_path, tokenizer_path, capsys):
    config = tiny_config(tokenizer_path, 4)
    train_lib.train(config, tmp_path / "unbroken")
    expected, _ = final_params(tmp_path / "unbroken", 4, config)

    workdir = tmp_path / "run"
    train_lib.train(tiny_config(tokenizer_path, 4), workdir)
    _corrupt(workdir / "checkpoints" / "4")
    (workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1234").mkdir()  # as a kill mid-save leaves
    capsys.readouterr()
    train_lib.train(tiny_config(tokenizer_path, 4), workdir)
    out = capsys.readouterr().out
    assert "checkpoint" in out and "/4 cannot be read" in out and "resumed from" in out
    assert out.index("resumed from") > out.index("/4 cannot be read")
    assert f"resumed from {workdir / 'checkpoints' / '2'}" in out
    # The unreadable checkpoint was kept aside for inspection, not deleted.
    kept = [p.name for p in (workdir / "checkpoints").iterdir()]
    assert any(name.startswith("4.unreadable") for name in kept), kept
    actual, _ = final_params(workdir, 4, config)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("target", ["data2_fsdp2_tensor2", "one_device"])
def test_checkpoint_restores_onto_another_mesh(tmp_path, target):
    source = factory_for(small_config(fsdp=8))
    state = source.create(jax.random.key(3))
    checkpoints = checkpoint_lib.Checkpointer(tmp_path, keep=1)
    checkpoints.save(7, state, {"step": 7})
    checkpoints.close()

    if target == "one_device":
        factory = factory_for(small_config(), jax.devices()[:1])
    else:
        factory = factory_for(small_config(data=2, fsdp=2, tensor=2))
    checkpoints = checkpoint_lib.Checkpointer(tmp_path, keep=1)
    step, restored, meta = checkpoints.restore_latest_readable(factory.abstract)
    checkpoints.close()
    assert step == 7 and meta["step"] == 7
    q = restored["params"]["layers"]["attn"]["q"]
    assert q.sharding == factory.shardings["params"]["layers"]["attn"]["q"]
    for a, b in zip(
        jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored))
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # other processes
def test_two_processes_save_and_resume(tmp_path, repo, tokenizer_path):
    """2 processes (gloo) write a checkpoint together, resume from it, and it reads back here."""
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    for steps in (2, 3):
        command = ["bash", "launch/local.sh", "2", *cli(tokenizer_path, workdir, steps)[3:]]
        result = subprocess.run(
            command,
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=600,
            env={**env, "JAX_PLATFORMS": "cpu"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints' / '2'}" in result.stdout
    assert [r["step"] for r in metric_rows(workdir) if "loss" in r] == [1, 2, 3]
    config = tiny_config(tokenizer_path, 3)
    params, meta = final_params(workdir, 3, config)  # 8 devices in one process here
    assert meta["data"]["iterator"] == {"next_index": 3}
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def _poison(monkeypatch, microbatches):
    """Make the given microbatches carry an out-of-range token: NaN embeddings, NaN loss."""

    class Poisoned(train_lib.pipeline.Batches):
        def __next__(self):
            index = self.get_state()["next_index"]
            batch = super().__next__()
            if index in microbatches:
                batch = {**batch, "inputs": batch["inputs"].copy()}
                batch["inputs"][0, 0] = 10**6  # beyond the vocabulary
            return batch

    monkeypatch.setattr(train_lib.pipeline, "Batches", Poisoned)


def test_nonfinite_raise_stops_and_saves_nothing_bad(tmp_path, tokenizer_path, monkeypatch):
    _poison(monkeypatch, {2})  # the third microbatch: step 3
    with pytest.raises(train_lib.NonFiniteError, match=r"non-finite loss nan.* at step 3"):
        train_lib.train(tiny_config(tokenizer_path, 6), tmp_path)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["2"]
    params, _ = final_params(tmp_path, 2, tiny_config(tokenizer_path, 6))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_nonfinite_skip_goes_on_then_stops_after_too_many(tmp_path, tokenizer_path, monkeypatch):
    _poison(monkeypatch, {2, 7, 8, 9})
    config = tiny_config(tokenizer_path, 6, every=6)
    config.train.nonfinite, config.train.max_skips_in_a_row = "skip", 3
    train_lib.train(config, tmp_path / "skip")
    rows = [r for r in metric_rows(tmp_path / "skip") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["skipped_microbatches"] == 1 and np.isfinite(rows[2]["loss"])
    params, meta = final_params(tmp_path / "skip", 6, config)
    assert meta["data"]["iterator"] == {"next_index": 7}  # the skipped microbatch was replaced
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))

    config.train.steps = 12  # resumes at 7: microbatches 7, 8, 9 are all poisoned
    with pytest.raises(train_lib.NonFiniteError, match="3 non-finite microbatches in a row"):
        train_lib.train(config, tmp_path / "skip")


def test_init_from_takes_params_but_not_optimizer_or_step(tmp_path, tokenizer_path):
    source = tiny_config(tokenizer_path, 2)
    train_lib.train(source, tmp_path / "source")
    source_params, _ = final_params(tmp_path / "source", 2, source)

    config = tiny_config(tokenizer_path, 1)  # step 1 of warmup has learning rate 0
    config.checkpoint.init_from = str(tmp_path / "source" / "checkpoints")
    train_lib.train(config, tmp_path / "finetune")
    checkpoints = checkpoint_lib.Checkpointer(tmp_path / "finetune" / "checkpoints", keep=3)
    state, meta = checkpoints.restore(1, factory_for(config).abstract)
    checkpoints.close()
    for a, b in zip(
        jax.tree.leaves(source_params), jax.tree.leaves(jax.device_get(state["params"]))
    ):
        np.testing.assert_array_equal(a, b)
    counts = [int(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) == 0]
    assert counts and all(c == 1 for c in counts), counts  # a fresh optimizer, one update old
    assert meta["step"] == 1


def test_unwritable_workdir_fails_at_start(tmp_path, tokenizer_path):
    (tmp_path / "checkpoints").write_text("a file where the checkpoint directory should be")
    with pytest.raises(checkpoint_lib.CheckpointError, match="cannot write checkpoints to"):
        train_lib.train(tiny_config(tokenizer_path, 2), tmp_path)


@contextlib.contextmanager
def tmpfs(mount: pathlib.Path, options: str):
    """A tmpfs mounted at `mount` (tests run as root) with mount `options`, for the block."""
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture
def read_only_mount(tmp_path):
    """A read-only file system: refuses writes even to root, as CI runs (chmod would not)."""
    with tmpfs(tmp_path / "read-only", "ro,size=1m") as mount:
        yield mount


@pytest.mark.parametrize("where", ["a_file", "read_only"])
def test_workdir_that_cannot_be_one_is_one_line_not_a_traceback(
    where, tmp_path, repo, tokenizer_path, request
):
    if where == "a_file":
        workdir = tmp_path / "notes.txt"
        workdir.write_text("not a run directory")
        words = [f"--workdir={workdir} is a file, not a directory", "give a new directory"]
    else:
        workdir = request.getfixturevalue("read_only_mount") / "run"
        words = [
            f"--workdir={workdir} cannot be created (Read-only file system)",
            "choose a directory you can write to",
        ]
    result = subprocess.run(
        cli(tokenizer_path, workdir, 2), capture_output=True, text=True, timeout=300, cwd=repo
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --workdir="), result.stderr[-2000:]
    for word in words:
        assert word in last, last


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "disk", "size=160m") as mount:
        yield mount


def test_disk_full_at_save_keeps_last_good_checkpoint(small_disk, tokenizer_path):
    workdir = small_disk / "run"
    config = tiny_config(tokenizer_path, 2, every=2)
    train_lib.train(config, workdir)
    good, _ = final_params(workdir, 2, config)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave room for the probe and logs, not for a checkpoint
        f.write(b"\0" * max(0, free - 256 * 1024))
    with pytest.raises(checkpoint_lib.CheckpointError, match="Earlier complete checkpoints|failed"):
        train_lib.train(tiny_config(tokenizer_path, 4, every=2), workdir)
    filler.unlink()
    again, _ = final_params(workdir, 2, config)
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_opening_a_run_read_only_logs_no_orbax_notices(tmp_path, caplog):
    """init_from, convert, generate and eval open checkpoints read-only: orbax's notices that
    it turned saving off are nothing a user can act on; other warnings still pass."""
    checkpoints = checkpoint_lib.Checkpointer(tmp_path, keep=1, probe=False)
    checkpoints.save(1, {"params": {"w": np.ones(3, np.float32)}}, {"step": 1})
    checkpoints.close()
    with caplog.at_level("WARNING"):
        manager, step = checkpoint_lib.open_read_only(tmp_path)
        assert step == 1 and checkpoint_lib.read_meta(manager, step) == {"step": 1}
        manager.close()
        absl_logging.warning("Given directory is read only: after opening, this one passes")
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "read_only=True" in m], messages
    assert messages == ["Given directory is read only: after opening, this one passes"]
