"""python -m jaxlm.sweep: the space's checks, trials as ordinary runs, pruning, failures, kill
and resume, and several workers on one study (journal file, and PostgreSQL when present)."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from configs import tiny  # noqa: E402
from jaxlm import config as config_lib  # noqa: E402
from jaxlm import sweep, sweep_devices, sweep_space, sweep_storage, sweep_trial  # noqa: E402
from jaxlm import train as train_lib  # noqa: E402
from jaxlm.data import tokenizer as tokenizer_lib  # noqa: E402
from jaxlm.errors import SweepError  # noqa: E402
from jaxlm.sweep_space import Space, choice, int_range, log_uniform, uniform  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi pi rho".split()


def _base(**fields):
    config = tiny.get_config()
    config.update_from_flattened_dict(fields)
    return config


# --- the space, checked before any trial ---------------------------------------------------------


@pytest.mark.parametrize(
    "params, message",
    [
        ({"train.lrr": log_uniform(1e-4, 1e-2)}, r"space train.lrr: train has no field 'lrr'"),
        ({"trian.lr": log_uniform(1e-4, 1e-2)}, r"space trian.lr: the config has no section"),
        ({"train.lr": log_uniform(1e-2, 1e-4)}, r"empty range: low < high"),
        ({"train.lr": log_uniform(0.0, 1e-2)}, r"a log range above 0"),
        ({"train.steps": uniform(1, 10)}, r"a float range cannot set an int field"),
        ({"model.remat": int_range(0, 3)}, r"cannot set a str field; use choice"),
        ({"model.remat": choice("none", 3)}, r"choices \[3\] are not str"),
        ({"model.remat": choice()}, r"at least one value"),
        ({"model.remat": choice("none", "everything")}, r"model.remat='everything' makes the"),
        ({"train.warmup_steps": int_range(-5, 5)}, r"train.warmup_steps=-5 makes the config"),
        ({}, r"space params=\{\}: at least one config field"),
    ],
)
def test_a_bad_space_is_one_line_naming_the_parameter(params, message):
    with pytest.raises(SweepError, match=message) as e:
        sweep_space.check(Space(params=params), _base(), n_devices=1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"sampler": "bayes"}, r"space sampler='bayes': one of \('tpe', 'random', 'grid'\)"),
        ({"pruner": "asha"}, r"space pruner='asha': one of"),
        ({"direction": "down"}, r"space direction='down'"),
        ({"sampler": "grid"}, r"sampler='grid' searches choice\(...\) parameters only"),
        ({"objective": "loss"}, r"space pruner='median': 'none' with objective='loss'"),
        ({"pruner_args": {"n_warmup": 3}}, r"pruner_args=\{'n_warmup': 3\}"),
    ],
)
def test_bad_sampler_pruner_and_objective_settings_are_named(fields, message):
    space = Space(params={"train.lr": log_uniform(1e-4, 1e-2)}, **fields)
    with pytest.raises(SweepError, match=message):
        sweep_space.check(space, _base(), n_devices=1)


def test_the_cli_stops_on_a_bad_space_or_storage_in_one_line_before_any_trial(tmp_path, repo):
    space = tmp_path / "space.py"
    space.write_text(
        "from jaxlm.sweep_space import Space, log_uniform\n"
        "def get_space():\n    return Space(params={'train.lr': log_uniform(1e-2, 1e-4)})\n"
    )
    bad_storage = "postgresql://jaxlm:secret@127.0.0.1:1/nowhere"
    for extra, expected in [
        ([], "sweep error: space train.lr=log-float [0.01, 0.0001]: an empty range"),
        ([f"--space={tmp_path}/none.py"], "sweep error: --space="),
    ]:
        result = _sweep(repo, tmp_path / "study", space, extra, timeout=120)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert result.stderr.startswith(expected), result.stderr
    space.write_text(space.read_text().replace("1e-2, 1e-4", "1e-4, 1e-2"))
    result = _sweep(repo, tmp_path / "study2", space, [f"--storage={bad_storage}"], timeout=120)
    line = result.stderr.strip()
    assert result.returncode == 1 and "\n" not in line, result.stderr
    assert line.startswith("sweep error: --storage=postgresql://jaxlm:***@127.0.0.1:1/nowhere")
    assert "secret" not in line
    assert not list((tmp_path / "study2").glob("trial-*"))


def test_a_trials_config_file_is_the_full_config_with_its_parameters(tmp_path):
    base = _base(**{"train.steps": 7, "model.remat": "full", "mesh.rules": (("embed", "fsdp"),)})
    params = {"train.lr": 0.00123, "model.remat": "none", "train.warmup_steps": 3}
    config = config_lib.with_fields(base, params)
    path = tmp_path / "config.py"
    path.write_text(sweep.config_file(config, "configs/tiny.py", params, str(tmp_path), 7))
    loaded = sweep_trial.load_config(path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.train.lr == 0.00123 and loaded.train.steps == 7 and loaded.model.remat == "none"
    assert base.train.lr == tiny.get_config().train.lr  # with_fields copies
    assert path.read_text().count("# sweep parameter") == 3


def test_a_grid_is_asked_point_by_point_without_repeats_while_trials_run():
    """As the sweep asks (a sampler per trial, seeded by the trials asked before; trials still
    running while the next is asked, as with --workers): every grid point once."""
    import optuna

    lrs = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    space = Space(params={"train.lr": choice(*lrs)}, sampler="grid", pruner="none")
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    asked = []
    for n in range(len(lrs)):
        study.sampler = space.make_sampler(n)
        asked.append(study.ask(space.distributions()))
        if n % 2:  # half of them finish before the next ask, half are still running
            study.tell(asked[-1], 1.0)
    assert sorted(t.params["train.lr"] for t in asked) == sorted(lrs)


def test_a_trial_directory_is_claimed_by_one_process_at_a_time(tmp_path):
    directory = tmp_path / "trial-0003"
    claim = sweep_storage.Claim.take(directory)
    assert claim and sweep_storage.Claim.take(directory) is None  # not even by this process
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        pass_fds=(claim.fd,),
    )
    claim.release()
    assert sweep_storage.is_held(directory)  # the child still holds the inherited lock
    holder.kill()
    holder.wait()
    assert not sweep_storage.is_held(directory)  # released by the kernel when it died
    assert sweep_storage.Claim.take(directory)


def test_workers_split_the_gpus_and_take_one_tpu_chip_each(monkeypatch):
    envs, per = sweep_devices.worker_envs(2, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert per == 2 and [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]
    with pytest.raises(SweepError, match=r"--workers=5: this host has 4 GPU"):
        sweep_devices.worker_envs(5, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    envs, per = sweep_devices.worker_envs(3, {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--x=1 "
                                      "--xla_force_host_platform_device_count=8"})  # fmt: skip
    assert per == 8 and envs == [{}, {}, {}]
    monkeypatch.setattr(sweep_devices, "_tpu_chips", lambda: ["/dev/accel0", "/dev/accel1"])
    monkeypatch.setattr(sweep_devices, "_gpu_ids", lambda environ: [])
    envs, per = sweep_devices.worker_envs(2, {})
    assert per == 1 and [e["TPU_VISIBLE_CHIPS"] for e in envs] == ["0", "1"]
    with pytest.raises(SweepError, match=r"this TPU VM has 2 chips"):
        sweep_devices.worker_envs(3, {})


# --- real sweeps: trials are short runs of a 2-layer model on a small chat set ------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base config file training a small model on a reversal task (SFT JSONL), its tokenizer."""
    root = tmp_path_factory.mktemp("sweep_setup")
    rng = np.random.default_rng(0)
    tokenizer = root / "tokenizer.model"
    docs = [" ".join(rng.choice(WORDS, 30)) for _ in range(200)]
    tokenizer_lib.train(docs, 320, tokenizer)
    with open(root / "chats.jsonl", "w") as f:
        for _ in range(300):
            words = list(rng.choice(WORDS, rng.integers(2, 5)))
            record = {"prompt": " ".join(words) + "\n", "completion": " ".join(words[::-1])}
            f.write(json.dumps(record) + "\n")
    (root / "base.py").write_text(
        "from configs import tiny\n\n\ndef get_config():\n"
        "    c = tiny.get_config()\n"
        "    c.model.update(dict(vocab_size=320, d_model=32, n_layers=2, n_heads=2,"
        " n_kv_heads=1, d_ff=64))\n"
        f"    c.data.update(dict(source='sft:{root}/chats.jsonl', tokenizer='{tokenizer}',"
        " chat_template='plain', seq_len=32, val_fraction=0.1, eval_batches=1))\n"
        "    c.train.update(dict(steps=6, global_batch_size=8, warmup_steps=0, log_every=2,"
        " eval_every=2))\n"
        "    c.checkpoint.every = 2\n"
        "    return c\n"
    )
    return root


def _space_file(path, body: str) -> pathlib.Path:
    path.write_text("from jaxlm.sweep_space import *\n\n\ndef get_space():\n    return " + body)
    return path


def _env(repo):
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                              env.get("XLA_FLAGS", ""))  # fmt: skip
    return env


def _sweep_command(base, space, study, extra):
    config = f"--config={base}" if base else "--config=configs/tiny.py"
    return [sys.executable, "-m", "jaxlm.sweep", config, f"--space={space}", f"--study={study}",
            *extra]  # fmt: skip


def _sweep(repo, study, space, extra, base=None, timeout=900):
    return subprocess.run(
        _sweep_command(base, space, study, extra),
        capture_output=True, text=True, cwd=repo, env=_env(repo), timeout=timeout,
    )  # fmt: skip


def _journal_study(study_dir):
    storage = sweep_storage.open_storage("", study_dir)
    return optuna.load_study(study_name=pathlib.Path(study_dir).name, storage=storage)


@pytest.mark.slow  # four short training runs in subprocesses, and one more to reproduce a trial
def test_trials_are_runs_pruned_and_failed_ones_are_recorded_and_the_study_goes_on(
    setup, repo, tmp_path
):
    study_dir = tmp_path / "study"
    space = _space_file(
        tmp_path / "space.py",
        "Space(params={'train.lr': log_uniform(1e-7, 1e-1), "
        f"'data.tokenizer': choice('{setup}/tokenizer.model', '{setup}/missing.model')}}, "
        "pruner='median', pruner_args={'n_startup_trials': 2, 'n_warmup_steps': 0})\n",
    )
    # The trials' order is set by enqueueing them: two good ones, one that cannot learn (the
    # pruner stops it at its first validation) and one whose tokenizer is missing (it fails).
    good = f"{setup}/tokenizer.model"
    study = optuna.create_study(
        study_name="study", storage=sweep_storage.open_storage("", study_dir)
    )
    for lr, tok in [(3e-3, good), (1e-2, good), (1e-7, good), (3e-3, f"{setup}/missing.model")]:
        study.enqueue_trial({"train.lr": lr, "data.tokenizer": tok})
    result = _sweep(repo, study_dir, space, ["--trials=4"], base=setup / "base.py")
    assert result.returncode == 0, result.stdout + result.stderr
    study = _journal_study(study_dir)
    states = [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL"], result.stdout
    pruned, failed = study.trials[2], study.trials[3]
    assert pruned.user_attrs["reason"].startswith("pruned at step 2: val_loss")
    assert "missing.model" in failed.user_attrs["reason"]
    # The ranked table and the best trial as a command of the base config and its parameters.
    out = result.stdout
    assert re.search(r"trial\s+state\s+val_loss\s+steps\s+data.tokenizer\s+train.lr", out)
    best = study.best_trial
    assert f"best trial {best.number}: val_loss {best.value:.4f}" in out
    assert f"--config.train.lr={best.params['train.lr']}" in out
    assert (
        "optimization_history.png" in out and (study_dir / "plots/parallel_coordinate.png").exists()
    )
    # Each trial is an ordinary run with the command that re-runs it printed.
    trial0 = study_dir / "trial-0000"
    assert (trial0 / "metrics.jsonl").exists() and (trial0 / "checkpoints" / "6").exists()
    assert f"python -m jaxlm.train --config={trial0}/config.py --workdir={trial0}" in out
    # ... whose config.py reproduces it: the same final validation loss, trained afresh.
    rerun = train_lib.train(sweep_trial.load_config(trial0 / "config.py"), tmp_path / "rerun")
    assert rerun["val_loss"] == pytest.approx(study.trials[0].value, rel=1e-6)
    # HParams: the objective beside the parameters, in the trial's TensorBoard directory.
    assert list((trial0 / "tensorboard").glob("*.hparams"))
    # --report prints the same table at any time.
    report = _sweep(repo, study_dir, space, ["--report"], base=setup / "base.py", timeout=300)
    assert report.returncode == 0 and f"best trial {best.number}" in report.stdout


def _trial_results(study_dir):
    study = _journal_study(study_dir)
    return [(t.number, t.state.name, t.params, t.value) for t in sorted(study.trials,
            key=lambda t: t.number)]  # fmt: skip


@pytest.mark.slow  # two sweeps of three short trials
def test_kill_9_mid_trial_and_resume_ends_as_an_unbroken_sweep(setup, repo, tmp_path):
    space = _space_file(
        tmp_path / "space.py",
        "Space(params={'train.lr': log_uniform(1e-3, 3e-2), 'train.b2': uniform(0.9, 0.99)},"
        " seed=3, pruner='none')\n",
    )
    # 30 steps a trial, a checkpoint every 5: the kill lands inside trial 1, far from its end.
    args = ["--trials=3", "--config.train.steps=30", "--config.checkpoint.every=5",
            "--config.train.eval_every=10"]  # fmt: skip
    unbroken = _sweep(repo, tmp_path / "unbroken", space, args, base=setup / "base.py")
    assert unbroken.returncode == 0, unbroken.stderr
    study_dir = tmp_path / "killed"
    process = subprocess.Popen(
        _sweep_command(setup / "base.py", space, study_dir, args),
        cwd=repo, env=_env(repo), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    checkpoint = study_dir / "trial-0001" / "checkpoints" / "5"
    deadline = time.time() + 600
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists()
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = process.stdout.read()
    assert "trial 1 starts" in first and "trial 1 complete" not in first
    resumed = _sweep(repo, study_dir, space, args, base=setup / "base.py")
    assert resumed.returncode == 0, resumed.stderr
    assert "trial 1 resumes from its checkpoint" in resumed.stdout
    assert not re.search(r"^trial 0 (starts|resumes)", resumed.stdout, re.M)  # it had ended
    assert "resumed from" in (study_dir / "trial-0001" / "train.log").read_text()
    assert _trial_results(study_dir) == _trial_results(tmp_path / "unbroken")


@pytest.mark.slow  # two sweep processes, four short trials
def test_two_sweep_processes_on_one_journal_never_run_the_same_trial(setup, repo, tmp_path):
    _two_workers_share_one_study(setup, repo, tmp_path, storage=None)


def _two_workers_share_one_study(setup, repo, tmp_path, storage):
    space = _space_file(
        tmp_path / "space.py",
        "Space(params={'train.lr': log_uniform(1e-3, 3e-2)}, pruner='none')\n",
    )
    # A server outlives the test (and CI may start from a copy of this machine's database):
    # a name of its own, or the workers would find last run's finished study and do nothing.
    study_name = f"{tmp_path.name}-{uuid.uuid4().hex[:8]}"
    extra = ["--trials=4"] + ([f"--storage={storage}", f"--study_name={study_name}"]
                              if storage else [])  # fmt: skip
    study_dir = tmp_path / "study"
    processes = [
        subprocess.Popen(
            _sweep_command(setup / "base.py", space, study_dir, extra),
            cwd=repo,
            env=_env(repo),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    started = [re.findall(r"^trial (\d+) starts", out, re.M) for out in outputs]
    assert all(started), outputs  # both worked
    everything = sorted(int(n) for numbers in started for n in numbers)
    assert everything == [0, 1, 2, 3], outputs  # each trial ran once, in one of them
    for n in everything:
        log = (study_dir / f"trial-{n:04d}" / "train.log").read_text()
        assert log.count("step 0/6 | validation loss") == 1
    if storage:
        optuna.delete_study(study_name=study_name, storage=storage)


POSTGRES_URL = os.environ.get("JAXLM_POSTGRES_URL", "postgresql://postgres@localhost/postgres")


@pytest.mark.slow  # two sweep processes against a real PostgreSQL server
def test_two_workers_share_a_study_on_postgresql(setup, repo, tmp_path):
    try:
        sweep_storage.open_storage(POSTGRES_URL, tmp_path)
    except SweepError as e:
        if os.environ.get("JAXLM_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"JAXLM_REQUIRE_POSTGRES=1 but no server: {e}")
        pytest.skip(f"no PostgreSQL server ({e}); .ci/run starts one")
    _two_workers_share_one_study(setup, repo, tmp_path, storage=POSTGRES_URL)
