"""Where a run's wall time went, across every attempt: goodput and the badput buckets.

    python -m jaxlm.goodput runs/tiny [--process=0]

Each process keeps a clock from the moment it started (the OS's process start time, so
imports and distributed init count): every second until its last event belongs to exactly
one bucket, written as it ends to RUN/goodput/process_<i>.jsonl, one JSON line per interval,
append-only and flushed, so a kill loses only the interval it interrupts. The buckets, after
ml-goodput-measurement's: startup (imports, distributed init, building the model, data and
optimizer), restore, compile (a step that compiles, with its own run), data_wait (the host
waiting for the input pipeline), productive (train steps), eval, checkpoint_save (the part
that blocks the loop: the dispatch of an async save, and the wait for the last one), and
lost: the steps a killed attempt computed past the checkpoint the next attempt resumed from,
which that attempt computes again. Goodput is productive time over the total.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import sys
import time

from etils import epath

BUCKETS = (
    "productive",
    "startup",
    "restore",
    "compile",
    "data_wait",
    "eval",
    "checkpoint_save",
    "lost",
)
STEP_BUCKETS = ("productive", "compile", "data_wait")  # what a redone step had cost
# Metrics row fields (all wall-clock: jaxlm.metrics.WALL_CLOCK_FIELDS).
METRIC_FIELDS = ("goodput", *(f"badput_{b}" for b in BUCKETS[1:]))

_IMPORTED_AT = time.time()


def process_start_time() -> float:
    """When this process started (Linux: /proc), else when this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


def account(events: list[dict]) -> dict:
    """The account of one process's events (all attempts): {"total", "attempts", "lost_steps",
    "seconds": bucket -> seconds}. An attempt's step intervals past the step the next attempt
    resumed from are lost."""
    attempts = collections.defaultdict(list)
    for event in events:
        attempts[event["attempt"]].append(event)
    ordered = list(attempts.values())  # appended in order: attempts are sequential
    seconds = dict.fromkeys(BUCKETS, 0.0)
    total, lost_steps = 0.0, 0
    for i, attempt in enumerate(ordered):
        following = ordered[i + 1] if i + 1 < len(ordered) else []
        redo_after = next((e["resume_step"] for e in following if "resume_step" in e), None)
        spans = [e for e in attempt if "t0" in e]
        if spans:
            total += max(e["t1"] for e in spans) - min(e["t0"] for e in spans)
        lost = set()
        for event in spans:
            step = event.get("step")
            redone = redo_after is not None and step is not None and step > redo_after
            for bucket, value in event["seconds"].items():
                if redone and bucket in STEP_BUCKETS:
                    seconds["lost"] += value
                    lost.add(step)
                else:
                    seconds[bucket] += value
        lost_steps += len(lost)
    return {"total": total, "attempts": len(ordered), "lost_steps": lost_steps, "seconds": seconds}


def fractions(summary: dict) -> dict:
    """The metrics row fields: goodput and each badput bucket, as fractions of the total."""
    total = max(summary["total"], 1e-9)
    seconds = summary["seconds"]
    return {
        "goodput": seconds["productive"] / total,
        **{f"badput_{b}": seconds[b] / total for b in BUCKETS[1:]},
    }


def describe(summary: dict) -> str:
    """One line: goodput, then each bucket's seconds and share."""
    total, seconds = summary["total"], summary["seconds"]
    parts = ", ".join(
        f"{b} {seconds[b]:.1f} s ({100 * seconds[b] / max(total, 1e-9):.1f}%)"
        for b in BUCKETS
        if seconds[b] or b == "productive"
    )
    return (
        f"goodput {100 * seconds['productive'] / max(total, 1e-9):.1f}% of {total:.1f} s over "
        f"{summary['attempts']} attempt(s), {summary['lost_steps']} step(s) redone: {parts}"
    )


class Recorder:
    """This attempt's clock. `mark(bucket)` ends the interval since the last mark in `bucket`,
    less what `inside` timed within it (the data wait inside a step)."""

    def __init__(self, path: epath.PathLike, earlier: list[dict], enabled: bool = True):
        self.path, self.earlier, self.enabled = epath.Path(path), earlier, enabled
        self.attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self.started = self.last = process_start_time()
        self.nested = collections.defaultdict(float)
        self.seconds = dict.fromkeys(BUCKETS, 0.0)
        self.resume_step = None
        self._before = account([*earlier, {"attempt": self.attempt}])  # until resumed_at
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")

    def _write(self, event: dict) -> None:
        if self.enabled:
            self._file.write(json.dumps({"attempt": self.attempt, **event}) + "\n")
            self._file.flush()

    def resumed_at(self, step: int) -> None:
        """The step this attempt starts from: the earlier attempt's steps past it are lost."""
        self.resume_step = step
        self._write({"resume_step": step})
        marker = {"attempt": self.attempt, "resume_step": step}
        self._before = account([*self.earlier, marker])  # the earlier attempts, lost included

    @contextlib.contextmanager
    def inside(self, bucket: str):
        begin = time.time()
        try:
            yield
        finally:
            self.nested[bucket] += time.time() - begin

    def mark(self, bucket: str, step: int | None = None) -> None:
        now = time.time()
        parts = dict(self.nested)
        parts[bucket] = parts.get(bucket, 0.0) + (now - self.last) - sum(self.nested.values())
        event = {"t0": self.last, "t1": now, "seconds": parts}
        self._write(event if step is None else {**event, "step": step})
        for name, value in parts.items():
            self.seconds[name] += value
        self.last = now
        self.nested.clear()

    def summary(self) -> dict:
        """The account so far, earlier attempts included."""
        before = self._before
        seconds = {b: before["seconds"][b] + self.seconds[b] for b in BUCKETS}
        return {
            "total": before["total"] + (self.last - self.started),
            "attempts": before["attempts"],
            "lost_steps": before["lost_steps"],
            "seconds": seconds,
        }

    def close(self) -> None:
        if self.enabled:
            self._file.close()


def main(argv: list[str]) -> int:
    import argparse

    from jaxlm import run as run_lib

    parser = argparse.ArgumentParser(prog="python -m jaxlm.goodput", description=__doc__)
    parser.add_argument("run", help="a run directory (python -m jaxlm.train --workdir)")
    parser.add_argument("--process", type=int, default=0, help="whose account (default 0)")
    args = parser.parse_args(argv)
    events = run_lib.goodput_events(args.run, args.process)
    if not events:
        print(f"error: no goodput log at {run_lib.goodput_log(args.run, args.process)}")
        return 1
    summary = account(events)
    print(describe(summary))
    for bucket in BUCKETS:
        share = 100 * summary["seconds"][bucket] / max(summary["total"], 1e-9)
        print(f"  {bucket:<16} {summary['seconds'][bucket]:>10.1f} s  {share:5.1f}%")
    print(f"  {'total':<16} {summary['total']:>10.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
