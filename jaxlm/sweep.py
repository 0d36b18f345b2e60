"""`python -m jaxlm.sweep --config=configs/tiny.py --space=configs/sweeps/tiny.py
--study=runs/sweeps/tiny --trials=24 [--workers=2] [--storage=URL] [--config.x.y=...]`.

A hyperparameter search (Optuna: ask/tell, TPE, pruners, storages) over ordinary runs. Each
trial is `STUDY/trial-NNNN/`, a run directory trained by `python -m jaxlm.sweep_trial` through
`jaxlm.train.train`, with its own config.py: the sweep prints the `python -m jaxlm.train`
command that re-runs or continues it. Each validation's val_loss goes to the pruner; a pruned
or failed trial is recorded with its reason and the sweep goes on.

Workers: `--workers=N` runs N trials at once, each with its share of the devices; any number of
sweep processes on the same study and storage cooperate (`jaxlm.sweep_storage`: a trial's
lock is the claim). Kill the sweep at any moment and start the same command again: finished
trials stay, interrupted ones resume from their checkpoints with the same parameters, and the
study stops at --trials trials. `--report` prints the table and writes the plots at any time.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from jaxlm import (
    cli,
    platforms,
    sweep_devices,
    sweep_report,
    sweep_space,
    sweep_storage,
    sweep_trial,
)
from jaxlm import config as config_lib
from jaxlm.errors import ConfigError, SweepError

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command's flags, defined when it runs (jaxlm.train defines --config too)."""
    config_flags.DEFINE_config_file(
        "config", "configs/tiny.py", "The base config file; every trial starts from it."
    )
    flags.DEFINE_string("space", "", "The search space file (configs/sweeps/*.py).")
    flags.DEFINE_string("study", "", "The study directory; default runs/sweeps/<space>.")
    flags.DEFINE_integer("trials", 20, "How many trials the study runs in all.")
    flags.DEFINE_integer("workers", 1, "Trials at once in this process.")
    flags.DEFINE_string(
        "storage", "", "Optuna storage URL (postgresql://...); default STUDY/journal.log."
    )
    flags.DEFINE_string("study_name", "", "Name in the storage; default the dir name.")
    flags.DEFINE_bool("report", False, "Print the table and write the plots; train nothing.")


POLL_SECONDS = 0.5


def config_file(config, base: str, params: dict, study_dir: str, number: int) -> str:
    """A trial's config.py: every field of the full config, the trial's parameters marked."""
    lines = [
        f'"""Trial {number} of the sweep in {study_dir}: {base}, the sweep\'s overrides, and the',
        'trial\'s parameters (marked). Written by jaxlm.sweep; trains as an ordinary run."""',
        "",
        "from jaxlm.config import default_config",
        "",
        "",
        "def get_config():",
        "    config = default_config()",
    ]

    def leaves(node, prefix):
        for key, value in node.items():
            if hasattr(value, "items"):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for name, value in leaves(config.to_dict(), ""):
        mark = "  # sweep parameter" if name in params else ""
        lines.append(f"    config.{name} = {value!r}{mark}")
    lines.append("    return config")
    return "\n".join(lines) + "\n"


class Sweep:
    """One sweep process: its worker slots, the study, the trials it runs."""

    def __init__(self, study, space, space_path, base, study_dir, storage_url, envs, trials):
        self.study, self.space, self.space_path, self.base = study, space, space_path, base
        self.study_dir, self.storage_url, self.envs = study_dir, storage_url, envs
        self.trials = trials
        self.running = {}  # slot -> (number, Popen, Claim, log file)
        self.stopping = False
        self.bar = tqdm(total=trials, unit="trial", disable=not sys.stderr.isatty())

    def say(self, line: str) -> None:
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()

    def finished_count(self) -> int:
        return sum(t.state.is_finished() for t in self.study.get_trials(deepcopy=False))

    def run(self) -> None:
        self.bar.update(self.finished_count())
        while True:
            for slot in list(self.running):
                if self.running[slot][1].poll() is not None:
                    self.collect(slot)
            if self.stopping:
                self.stop_all()
                return
            free = [s for s in range(len(self.envs)) if s not in self.running]
            for slot in free:
                if not self.start_next(slot):
                    break
            if not self.running and self.all_done():
                return
            time.sleep(POLL_SECONDS)

    def all_done(self) -> bool:
        """No trial left to start or resume here, and none running anywhere."""
        started = _started(self.study)
        return len(started) >= self.trials and all(t.state.is_finished() for t in started)

    def start_next(self, slot: int) -> bool:
        """Resume an interrupted trial, else ask a new one within --trials; False if none."""
        trials = self.study.get_trials(deepcopy=False)
        mine = {number for number, *_ in self.running.values()}
        for t in trials:
            if (
                t.state.name == "RUNNING"
                and t.number not in mine
                and len(t.params) == len(self.space.params)
            ):
                claim = sweep_storage.Claim.take(sweep_storage.trial_dir(self.study_dir, t.number))
                if claim:
                    self.launch(slot, t.number, t._trial_id, t.params, claim, resumed=True)
                    return True
        started = len(_started(self.study))
        if started >= self.trials:
            return False
        self.study.sampler = self.space.make_sampler(started)
        trial = self.study.ask(self.space.distributions())
        claim = sweep_storage.Claim.take(sweep_storage.trial_dir(self.study_dir, trial.number))
        if claim:  # else a resuming worker took it between the ask and now: it runs it
            self.launch(slot, trial.number, trial._trial_id, trial.params, claim, resumed=False)
        return True

    def launch(self, slot, number, trial_id, params, claim, resumed) -> None:
        directory = sweep_storage.trial_dir(self.study_dir, number)
        if (directory / sweep_trial.RESULT).exists():  # it ended; the sweep died before saying so
            self.running[slot] = (number, _Done(), claim, None)
            return
        config_path = directory / "config.py"
        if not config_path.exists():
            config = config_lib.with_fields(self.base, params)
            text = config_file(config, self.study.user_attrs.get("config"), params,
                               self.study_dir, number)  # fmt: skip
            config_path.write_text(text)
        (directory / sweep_trial.TRIAL_INFO).write_text(
            json.dumps(
                {
                    "storage": self.storage_url,
                    "study_dir": self.study_dir,
                    "study_name": self.study.study_name,
                    "trial_id": trial_id,
                    "space": self.space_path,
                }
            )
        )
        log = open(directory / "train.log", "a")
        process = subprocess.Popen(
            [sys.executable, "-m", "jaxlm.sweep_trial", str(directory)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.envs[slot]},
            pass_fds=(claim.fd,),
            start_new_session=True,  # Ctrl-C reaches the sweep, which stops its trials
        )
        self.running[slot] = (number, process, claim, log)
        shown = ", ".join(f"{k}={sweep_report._value(v)}" for k, v in params.items())
        self.say(
            f"trial {number} {'resumes from its checkpoint' if resumed else 'starts'}: {shown}\n"
            f"  log {directory / 'train.log'}; re-run or continue it: python -m jaxlm.train "
            f"--config={config_path} --workdir={directory}"
        )

    def collect(self, slot: int) -> None:
        """Record the trial of `slot`, whose process ended."""
        import optuna
        from optuna.trial import TrialState

        number, process, claim, log = self.running.pop(slot)
        if log:
            log.close()
        directory = sweep_storage.trial_dir(self.study_dir, number)
        code = process.returncode
        result_path = directory / sweep_trial.RESULT
        if result_path.exists():
            result = json.loads(result_path.read_text())
        elif code == _PREEMPTED or self.stopping:
            claim.release()  # interrupted: a later sweep resumes it from its checkpoint
            self.say(f"trial {number} stopped at its checkpoint; it resumes when the sweep does")
            return
        else:
            result = {"state": "failed", "reason": _exit_reason(code, directory / "train.log")}
        frozen = self.study._storage.get_trial(self._trial_id(number))
        trial = optuna.trial.Trial(self.study, frozen._trial_id)
        self.study.sampler = optuna.samplers.RandomSampler()  # whose after_trial stops nothing
        if result["state"] == "complete":
            trial.set_user_attr("steps", result["step"])
            self.study.tell(number, result["value"])
            sweep_report.write_hparams(str(directory), frozen.params, self.space.objective,
                                       result["value"], result["step"])  # fmt: skip
            line = f"{self.space.objective} {result['value']:.4f} at step {result['step']}"
        else:
            trial.set_user_attr("reason", result["reason"])
            if frozen.last_step is not None:
                trial.set_user_attr("steps", frozen.last_step)
            state = TrialState.PRUNED if result["state"] == "pruned" else TrialState.FAIL
            self.study.tell(number, state=state)
            line = result["reason"]
        claim.release()
        self.bar.update(1)
        self.say(f"trial {number} {result['state']}: {line}")

    def _trial_id(self, number: int) -> int:
        for t in self.study.get_trials(deepcopy=False):
            if t.number == number:
                return t._trial_id
        raise SweepError(f"trial {number} is not in study {self.study.study_name}")

    def stop_all(self) -> None:
        for _, process, *_ in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # each saves a checkpoint and exits
        for slot in list(self.running):
            self.running[slot][1].wait()
            self.collect(slot)


def _started(study) -> list:
    """The trials asked so far (enqueued ones wait for an ask to take them)."""
    return [t for t in study.get_trials(deepcopy=False) if t.state.name != "WAITING"]


_PREEMPTED = 42  # jaxlm.train.PREEMPTED_EXIT_CODE, without importing the train stack


class _Done:
    """A trial process that ended before this sweep started: its result is on disk."""

    returncode = 0

    def poll(self):
        return 0

    def wait(self):
        return 0


def _exit_reason(code: int, log_path) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    try:
        lines = [line for line in open(log_path).read().splitlines() if line.strip()]
    except OSError:
        lines = []
    return f"exit status {code}: {lines[-1][:300] if lines else 'no output'}"


def open_study(storage, name: str, space, config_path: str, overrides: list[str]):
    """Create the study, or load it and check it was created with the same parameters."""
    import optuna

    study = optuna.create_study(
        study_name=name, storage=storage, direction=space.direction, load_if_exists=True
    )
    names = sorted(space.params)
    if "params" not in study.user_attrs:
        study.set_user_attr("params", names)
        study.set_user_attr("config", config_path)
        study.set_user_attr("overrides", overrides)
        study.set_user_attr("objective", space.objective)
    elif study.user_attrs["params"] != names:
        raise SweepError(
            f"--study: study {name!r} searches {study.user_attrs['params']}, the space now "
            f"{names}; give another --study (or --study_name) for a new search"
        )
    return study


def shared_tokenizer(config, space, study_dir: str) -> None:
    """Train the built-in corpus's tokenizer once for the study (not once per trial), unless
    the space varies what it depends on."""
    from jaxlm.data import corpus
    from jaxlm.data import tokenizer as tokenizer_lib

    d = config.data
    varied = {"model.vocab_size", "seed", "data.val_fraction", "data.tokenizer"} & set(space.params)
    if d.source != "builtin" or d.tokenizer or varied:
        return
    path = os.path.join(os.path.abspath(study_dir), "tokenizer.model")
    if not os.path.exists(path):
        docs = corpus.builtin_documents("train", d.val_fraction)
        tokenizer_lib.train(docs, config.model.vocab_size, path, seed=config.seed)
    d.tokenizer = path


def main(argv) -> None:
    platforms.skip_absent_tpu()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    try:
        _main()
    except (SweepError, ConfigError) as e:
        sys.exit(f"sweep error: {e}")


def _main() -> None:
    space_name = os.path.splitext(os.path.basename(FLAGS.space))[0] or "sweep"
    study_dir = FLAGS.study or os.path.join("runs", "sweeps", space_name)
    name = FLAGS.study_name or os.path.basename(os.path.normpath(study_dir))
    if FLAGS.report:
        return report(study_dir, name)
    if not FLAGS.space:
        raise SweepError("--space: give a search space file, e.g. --space=configs/sweeps/tiny.py")
    if FLAGS.trials < 1:
        raise SweepError(f"--trials={FLAGS.trials}: give 1 or more")
    space = sweep_space.load(FLAGS.space)
    envs, n_devices = sweep_devices.worker_envs(FLAGS.workers)
    base = FLAGS.config
    sweep_space.check(space, base, n_devices)
    trials = FLAGS.trials
    if space.sampler == "grid":
        trials = min(trials, math.prod(len(d.choices) for d in space.params.values()))
    storage = sweep_storage.open_storage(FLAGS.storage, study_dir)
    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    study = open_study(storage, name, space, config_path, overrides)
    os.makedirs(study_dir, exist_ok=True)
    shared_tokenizer(base, space, study_dir)
    sweep = Sweep(
        study,
        space,
        os.path.abspath(FLAGS.space),
        base,
        os.path.abspath(study_dir),
        FLAGS.storage,
        envs,
        trials,
    )
    print(
        f"sweep {name}: {trials} trials of {config_path}, {len(space.params)} parameters, "
        f"{space.sampler} sampler, {space.pruner} pruner, {len(envs)} worker(s) x {n_devices} "
        f"device(s); storage {sweep_storage.shown(FLAGS.storage) or study_dir + '/journal.log'}",
        flush=True,
    )

    def stop(signum, frame):
        sweep.stopping = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        sweep.run()
    finally:
        sweep.bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if sweep.stopping:
        print("stopped: running trials saved checkpoints; start the same command to resume")
        sys.exit(_PREEMPTED)
    report(study_dir, name, study)


def report(study_dir: str, name: str, study=None) -> None:
    import optuna

    if study is None:
        storage = FLAGS.storage
        if not storage and not os.path.exists(os.path.join(study_dir, sweep_storage.JOURNAL)):
            raise SweepError(f"--study={study_dir}: no study there (no journal.log); run one first")
        try:
            study = optuna.load_study(
                study_name=name, storage=sweep_storage.open_storage(storage, study_dir)
            )
        except KeyError:
            raise SweepError(f"--study_name={name}: no such study in the storage") from None
    objective = study.user_attrs.get("objective", "val_loss")
    print(sweep_report.table(study, objective))
    command = sweep_report.best_command(study)
    if command:
        print(f"best trial {study.best_trial.number}: {objective} {study.best_value:.4f}")
        print(f"  {command}")
    print(sweep_report.plots(study, study_dir))
    print(f"TensorBoard (HParams tab compares the trials): tensorboard --logdir {study_dir}")


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
