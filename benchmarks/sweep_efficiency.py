"""The same space searched with and without pruning: the best objective each finds and the
training steps each spends (the compute pruning saves).

    python -m benchmarks.sweep_efficiency --trials=12 --steps=100 --eval_every=25

Runs `python -m jaxlm.sweep` twice on configs/tiny.py with configs/sweeps/tiny.py, the second
time with its pruner set to "none" (a copy of the space file), same sampler seed; counts the
steps each trial trained from its metrics.jsonl. The pruned sweep is the README's demo; its
best is compared with the default config trained for the same steps (`python -m jaxlm.train
--config=configs/tiny.py`, nothing searched). Records a row in
benchmarks/results/sweep-efficiency-<cpu>.{jsonl,md}.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import results_table

_TRIALS = flags.DEFINE_integer("trials", 12, "Trials per sweep.")
_STEPS = flags.DEFINE_integer("steps", 100, "train.steps of each trial.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 25, "train.eval_every: the pruner's reports.")
_SPACE = flags.DEFINE_string("space", "configs/sweeps/tiny.py", "The space file.")
_OUT = flags.DEFINE_string("out", "", "Where the studies go; default a temporary directory.")


def run_sweep(space: str, study: pathlib.Path) -> float:
    """Run one sweep to the end; its wall time."""
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable, "-m", "jaxlm.sweep", "--config=configs/tiny.py", f"--space={space}",
            f"--study={study}", f"--trials={_TRIALS.value}",
            f"--config.train.steps={_STEPS.value}",
            f"--config.train.eval_every={_EVAL_EVERY.value}",
            f"--config.checkpoint.every={_STEPS.value}",
        ],
        check=True,
    )  # fmt: skip
    return time.perf_counter() - start


def default_run(root: pathlib.Path) -> tuple[float, float]:
    """The default config's final val_loss at the trials' steps, and its wall time."""
    from jaxlm import metrics

    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable, "-m", "jaxlm.train", "--config=configs/tiny.py",
            f"--workdir={root / 'default'}", f"--config.train.steps={_STEPS.value}",
            f"--config.train.eval_every={_EVAL_EVERY.value}",
            f"--config.checkpoint.every={_STEPS.value}",
        ],
        check=True,
    )  # fmt: skip
    return metrics.last_value(root / "default", "val_loss")[0], time.perf_counter() - start


def summary(study: pathlib.Path) -> dict:
    """Best objective, trials by state, and total steps trained (from each trial's metrics)."""
    import optuna

    from jaxlm import metrics, sweep_storage

    loaded = optuna.load_study(study_name=study.name, storage=sweep_storage.open_storage("", study))
    steps = 0
    for t in loaded.trials:
        directory = sweep_storage.trial_dir(study, t.number)
        found = [metrics.last_value(directory, key) for key in ("loss", "val_loss")]
        steps += max((f[1] for f in found if f), default=0)
    states = [t.state.name for t in loaded.trials]
    return {
        "best": loaded.best_value,
        "steps": steps,
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
    }


def main(argv):
    del argv
    root = pathlib.Path(_OUT.value or tempfile.mkdtemp(prefix="sweep_efficiency_"))
    root.mkdir(parents=True, exist_ok=True)
    unpruned_space = root / "space_unpruned.py"
    text = pathlib.Path(_SPACE.value).read_text()
    unpruned_space.write_text(text + "\n\n_pruned = get_space\n\n\ndef get_space():\n"
                              "    import dataclasses\n\n"
                              "    return dataclasses.replace(_pruned(), pruner='none', "
                              "pruner_args={})\n")  # fmt: skip
    results = {}
    for name, space in (("pruned", _SPACE.value), ("unpruned", str(unpruned_space))):
        wall = run_sweep(space, root / name)
        results[name] = {**summary(root / name), "wall_s": wall}
        print(name, results[name], flush=True)
    default_loss, default_wall = default_run(root)
    print("default", default_loss, flush=True)
    model, cores, slug = results_table.cpu()
    load = os.getloadavg()[0]
    row = {
        "trials": _TRIALS.value, "steps_per_trial": _STEPS.value, "eval_every": _EVAL_EVERY.value,
        "space": _SPACE.value, "cpu": model, "cores": cores, "load_avg_1m_at_end": load,
        "default_val_loss": default_loss, "default_wall_s": default_wall,
        **{f"{k}_{f}": v for k, r in results.items() for f, v in r.items()},
    }  # fmt: skip
    p, u = results["pruned"], results["unpruned"]
    table = results_table.record(
        f"benchmarks/results/sweep-efficiency-{slug}",
        [row],
        "# Sweep efficiency: pruning against none (benchmarks/sweep_efficiency.py)\n\n"
        "The same space, sampler and seed; best: the lowest final val_loss; steps: the "
        "training steps all trials took together; default: configs/tiny.py as it is, trained "
        "for the same steps; wall: the pruned sweep, start to end.",
        ["trials x steps", "best pruned", "best unpruned", "difference", "steps pruned",
         "steps unpruned", "compute saved", "pruned/failed", "default val_loss",
         "wall pruned", "load (1 min)"],
        [[
            f"{_TRIALS.value} x {_STEPS.value}", f"{p['best']:.4f}", f"{u['best']:.4f}",
            f"{p['best'] - u['best']:+.4f}", p["steps"], u["steps"],
            f"{1 - p['steps'] / max(u['steps'], 1):.0%}", f"{p['pruned']}/{p['failed']}",
            f"{default_loss:.4f}", f"{p['wall_s'] / 60:.1f} min", f"{load:.1f}",
        ]],
    )  # fmt: skip
    print(f"recorded in {table}")


if __name__ == "__main__":
    app.run(main)
