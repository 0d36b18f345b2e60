"""One trial of a sweep: `python -m jaxlm.sweep_trial TRIAL_DIR`, started by `jaxlm.sweep`.

The trial is an ordinary run: `jaxlm.train.train` on TRIAL_DIR/config.py in TRIAL_DIR, as
`python -m jaxlm.train --config=TRIAL_DIR/config.py --workdir=TRIAL_DIR` would run it, plus
each validation's val_loss reported to the Optuna trial, whose pruner may stop it. The outcome
goes to TRIAL_DIR/sweep_result.json (complete with its objective, pruned or failed with the
reason) for the sweep to record; SIGTERM saves a checkpoint and exits with
`train.PREEMPTED_EXIT_CODE`, leaving the trial to be resumed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys
import threading
import time

from jaxlm import platforms

RESULT = "sweep_result.json"
TRIAL_INFO = "sweep_trial.json"


def _exit_with_parent() -> None:
    """A sweep killed with SIGKILL cannot stop its trials: each dies with it, as a killed
    `python -m jaxlm.train` would (it resumes from its newest checkpoint). On Linux the
    kernel sends the SIGKILL (PR_SET_PDEATHSIG); elsewhere, or if the sweep died before
    that was set, a thread notices the new parent."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def load_config(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location("jaxlm_trial_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _failure(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    if "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower():
        return f"out of memory: {first[:300]}"
    return f"{type(error).__name__}: {first[:300]}"


def run(trial_dir: pathlib.Path) -> int:
    """Train the trial; write its result; the process's exit status."""
    import optuna
    from absl import logging

    from jaxlm import files, sweep_space, sweep_storage
    from jaxlm import metrics as metrics_lib
    from jaxlm import train as train_lib
    from jaxlm.errors import Preempted

    logging.set_verbosity(logging.WARNING)
    info = json.loads((trial_dir / TRIAL_INFO).read_text())
    space = sweep_space.load(info["space"])
    storage = sweep_storage.open_storage(info["storage"], info["study_dir"])
    study = optuna.load_study(
        study_name=info["study_name"], storage=storage, pruner=space.make_pruner()
    )
    trial = optuna.trial.Trial(study, info["trial_id"])

    def report(step: int, val_loss: float) -> None:
        trial.report(val_loss, step)
        if trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned at step {step}: val_loss {val_loss:.4f} ({space.pruner} pruner)"
            )

    def write(result: dict) -> None:
        files.write_atomically(trial_dir / RESULT, json.dumps(result) + "\n")

    try:
        config = load_config(trial_dir / "config.py")
        train_lib.train(config, trial_dir, report if space.pruner != "none" else None)
    except optuna.TrialPruned as e:
        write({"state": "pruned", "reason": str(e)})
        return 0
    except Preempted as e:
        print(f"{e}; the sweep resumes the trial when started again", flush=True)
        return train_lib.PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        return 1
    except Exception as e:  # a config error, non-finite loss, out of memory: the sweep goes on
        import traceback

        traceback.print_exc()
        write({"state": "failed", "reason": _failure(e)})
        return 0
    found = metrics_lib.last_value(trial_dir, space.objective)
    if found is None:
        write({"state": "failed", "reason": f"metrics.jsonl has no {space.objective!r}"})
    else:
        write({"state": "complete", "value": found[0], "step": found[1]})
    return 0


def main() -> None:
    platforms.skip_absent_tpu()  # before JAX starts
    if len(sys.argv) != 2:
        sys.exit("usage: python -m jaxlm.sweep_trial TRIAL_DIR (started by jaxlm.sweep)")
    _exit_with_parent()
    sys.exit(run(pathlib.Path(sys.argv[1])))


if __name__ == "__main__":
    main()
