"""jaxlm.goodput: an account of a run's wall time that survives kills and resumes."""

import json
import subprocess
import sys
import time

import pytest
from support import short_run_config
from test_fault_tolerance import cli, metric_rows, run_until

from jaxlm import goodput
from jaxlm import train as train_lib


def _span(attempt, t0, t1, bucket, step=None):
    event = {"attempt": attempt, "t0": t0, "t1": t1, "seconds": {bucket: t1 - t0}}
    return event if step is None else {**event, "step": step}


def test_account_moves_the_steps_a_killed_attempt_redid_to_lost():
    events = [
        {"attempt": "a", "resume_step": 0},
        _span("a", 0.0, 3.0, "startup"),
        *(_span("a", 2.0 + s, 3.0 + s, "productive", s) for s in range(1, 6)),  # steps 1-5
        {"attempt": "b", "resume_step": 3},  # a's steps 4 and 5 are computed again
        _span("b", 20.0, 21.5, "restore"),
        *(_span("b", 17.5 + s, 18.5 + s, "productive", s) for s in range(4, 7)),  # steps 4-6
    ]
    summary = goodput.account(events)
    assert summary["attempts"] == 2 and summary["lost_steps"] == 2
    assert summary["total"] == pytest.approx(8.0 + 4.5)  # 0..8 and 20..24.5
    seconds = summary["seconds"]
    assert seconds["lost"] == pytest.approx(2.0)
    assert seconds["productive"] == pytest.approx(3.0 + 3.0)
    assert seconds["startup"] == pytest.approx(3.0) and seconds["restore"] == pytest.approx(1.5)
    assert sum(seconds.values()) == pytest.approx(summary["total"])
    assert goodput.fractions(summary)["goodput"] == pytest.approx(6.0 / 12.5)


def _last_step(rows):
    return max(r["step"] for r in rows if "loss" in r)


@pytest.mark.slow  # three attempts, each compiling
def test_two_failed_attempts_lose_exactly_the_steps_computed_past_their_checkpoints(
    tmp_path, tokenizer_path, monkeypatch
):
    """Where an attempt stops is known to the step (a failing input pipeline, not a kill, whose
    moment falls anywhere): the lost steps are exactly the metrics rows past the checkpoint
    the next attempt resumed from, and the buckets add up to the wall time."""
    config = short_run_config(tokenizer_path, 9)
    config.checkpoint.every = 3
    config.train.eval_every = 100
    fail_at = [5, 7]  # batch indices: steps 6 and 8's batches

    class Fails(train_lib.pipeline.Batches):
        def __next__(self):
            if fail_at and self.get_state()["next_index"] == fail_at[0]:
                raise RuntimeError(f"input failed at {fail_at.pop(0)}")
            return super().__next__()

    monkeypatch.setattr(train_lib.pipeline, "Batches", Fails)
    redone = 0
    for _ in range(2):
        with pytest.raises(RuntimeError, match="input failed"):
            train_lib.train(config, tmp_path)
        computed = _last_step(metric_rows(tmp_path))  # rows past the checkpoint are rewound
        newest = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
        assert computed > newest
        redone += computed - newest
    train_lib.train(config, tmp_path)

    summary = goodput.account(
        [json.loads(x) for x in open(tmp_path / "goodput" / "process_0.jsonl")]
    )
    assert summary["attempts"] == 3 and summary["lost_steps"] == redone
    assert summary["seconds"]["lost"] > 0
    assert sum(summary["seconds"].values()) == pytest.approx(summary["total"], rel=1e-9)


@pytest.mark.slow  # other processes
def test_killed_twice_the_account_adds_up_and_counts_the_redone_steps(
    tmp_path, repo, tokenizer_path
):
    workdir = tmp_path / "run"
    command = cli(tokenizer_path, workdir, steps=9, every=3)
    wall, redone = 0.0, 0
    for kill_after in ("step 5/9 | loss", "step 8/9 | loss"):
        begin = time.monotonic()
        code, output = run_until(command, repo, kill_after, delay=0.0, timeout=1500)
        wall += time.monotonic() - begin
        assert code == -9, output
        # The steps past the newest checkpoint were computed and will be computed again.
        newest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
        redone += _last_step(metric_rows(workdir)) - newest
    begin = time.monotonic()
    code, output = run_until(command, repo, timeout=1500)
    wall += time.monotonic() - begin
    assert code == 0, output
    assert "goodput" in output.splitlines()[-1] and "3 attempt(s)" in output

    events = [json.loads(x) for x in open(workdir / "goodput" / "process_0.jsonl")]
    summary = goodput.account(events)
    assert summary["attempts"] == 3
    # A SIGKILL can fall between a step's line in the account and its metrics row: that step
    # is then lost but not in the rows. Exact equality where the stop is known to the step:
    # test_two_failed_attempts_lose_exactly_the_steps_computed_past_their_checkpoints.
    assert redone <= summary["lost_steps"] <= redone + 2
    assert summary["seconds"]["lost"] > 0
    assert sum(summary["seconds"].values()) == pytest.approx(summary["total"], rel=0.01)
    # The account's clock starts when each process does and stops at its last event.
    assert 0.5 * wall < summary["total"] < wall + 5.0
    rows = metric_rows(workdir)
    goodputs = [r["goodput"] for r in rows if "loss" in r]
    assert all(0 <= g < 1 for g in goodputs) and goodputs[-1] > 0  # step 1 only compiled

    report = subprocess.run(
        [sys.executable, "-m", "jaxlm.goodput", str(workdir)],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr
    assert f"{summary['lost_steps']} step(s) redone" in report.stdout
    assert "lost" in report.stdout and "total" in report.stdout
