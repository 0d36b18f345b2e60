"""Gradient accumulation, learning on the built-in corpus, the CLI, 7B at scale (AOT), and
what TensorBoard shows after a resume."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from support import (
    factory_for,
    float32_roundoff,
    loss_terms,
    one_document_batch,
    short_run_config,
    small_config,
    tensorboard_view,
)

from configs import tiny
from jaxlm import sharding as sharding_lib
from jaxlm import step as step_lib
from jaxlm import train as train_lib


def _adam_state(opt_state):
    return [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")
    ][0]


def _run_steps(config, batches):
    factory = factory_for(config)
    state = factory.create(jax.random.key(0))
    step = step_lib.make_train_step(factory)
    with factory.context():
        for batch in batches:
            state, _ = step(state, sharding_lib.global_batch(batch, factory.batch_sharding))
    return jax.device_get(state)


def test_accumulating_four_microbatches_equals_one_big_batch():
    # Adam's first step is lr * g / (|g| + eps): with eps=1e-8 a coordinate whose gradient is
    # ~1e-8 turns float32 rounding of g into a visible difference. eps=1e-4 keeps that
    # step well-conditioned, so the params comparison below tests accumulation, not rounding.
    big = small_config(fsdp=8)
    big.train.global_batch_size, big.train.eps = 32, 1e-4
    batch = one_document_batch(big, 32)
    micro = small_config(fsdp=8)
    micro.train.global_batch_size, micro.train.grad_accum_steps, micro.train.eps = 32, 4, 1e-4
    pieces = [{k: v[i * 8 : (i + 1) * 8] for k, v in batch.items()} for i in range(4)]

    one = _run_steps(big, [batch])
    accumulated = _run_steps(micro, pieces)

    # Adam's first moment after one update is (1 - b1) * gradient: compare gradients there.
    mu_one = _adam_state(one["opt_state"]).mu
    mu_acc = _adam_state(accumulated["opt_state"]).mu
    # Four partial sums over tokens, then their sum: float32 round-off (support.loss_terms).
    for a, b in zip(jax.tree.leaves(mu_one), jax.tree.leaves(mu_acc)):
        assert np.abs(a - b).max() <= float32_roundoff(a, loss_terms(big))
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(accumulated["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    # And the parameters did move: the update is not a no-op.
    fresh = jax.device_get(factory_for(big).create(jax.random.key(0))["params"])
    assert np.abs(fresh["layers"]["mlp"]["up"] - one["params"]["layers"]["mlp"]["up"]).max() > 1e-4


def _metrics(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def test_tiny_config_learns(tmp_path, tokenizer_path):
    config = tiny.get_config()
    config.data.tokenizer = tokenizer_path
    config.data.seq_len = 128
    config.train.global_batch_size = 16
    config.train.steps = 60
    config.train.warmup_steps = 10
    config.train.log_every = 20
    config.train.eval_every = 30
    train_lib.train(config, tmp_path)
    val = [row["val_loss"] for row in _metrics(tmp_path) if "val_loss" in row]
    # Measured on 8 simulated CPU devices: 8.36 at step 0 (about ln 4096), 5.59 after 60
    # steps. A model that learned nothing stays near 8.3.
    assert val[0] > 8.0
    assert val[-1] < 6.3 and val[-1] < val[0] - 2.0


@pytest.mark.slow  # a subprocess
def test_cli_trains_and_writes_metrics_and_checkpoint(tmp_path, repo, tokenizer_path):
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "jaxlm.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.train.steps=3",
        "--config.train.log_every=1",
        "--config.data.seq_len=64",
        f"--config.data.tokenizer={tokenizer_path}",
        "--config.train.loss_chunks=4",
    ]  # train and eval steps through jaxlm.loss
    result = subprocess.run(
        command,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in _metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert "tokens_per_second" not in rows[0]  # step 1 compiles: not timed
    assert all(r["tokens_per_second"] > 0 and 0 < r["mfu"] < 1 for r in rows[1:])
    assert (workdir / "checkpoints" / "3" / "state").is_dir()
    assert "step 3/3" in result.stdout and "checkpoint" in result.stdout


AOT_7B = """
import json, importlib.util, jax
from jaxlm import step as step_lib
spec = importlib.util.spec_from_file_location("config_7b", "configs/7b.py")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
config = module.get_config()
config.mesh.update(dict(data=1, fsdp=64, tensor=1, sequence=1))
factory, derived = step_lib.build(config)
batch = step_lib.abstract_batch(factory, derived.micro_batch_size, config.data.seq_len)
with factory.context():
    compiled = step_lib.make_train_step(factory).lower(factory.abstract, batch).compile()
memory = compiled.memory_analysis()
print(json.dumps(dict(
    params=sum(x.size for x in jax.tree.leaves(factory.abstract["params"])),
    derived_params=derived.n_params, devices=jax.device_count(),
    argument=memory.argument_size_in_bytes, temp=memory.temp_size_in_bytes,
    q_spec=str(factory.abstract["params"]["layers"]["attn"]["q"].sharding.spec))))
"""


@pytest.mark.slow  # a subprocess
def test_7b_compiles_for_64_devices_within_memory(repo):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=64",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", AOT_7B],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 64
    assert abs(report["params"] - 6.74e9) <= 0.01 * 6.74e9
    assert report["params"] == report["derived_params"]
    assert "fsdp" in report["q_spec"]
    per_device_gib = (report["argument"] + report["temp"]) / 2**30
    assert 0.3 < per_device_gib < 95, per_device_gib


def test_resumed_run_hides_the_tensorboard_steps_it_repeats(tmp_path):
    """A run killed after step 6 and resumed from the checkpoint of step 3 logs 4.. again."""
    from jaxlm import metrics as metrics_lib

    first = metrics_lib.Writer(tmp_path, first_step=0)
    for step in range(1, 7):
        first.write(step, {"loss": 1.0 / step})
    first.close()
    assert [s for _, s, _ in tensorboard_view(tmp_path / "tensorboard")] == [1, 2, 3, 4, 5, 6]
    time.sleep(1.1)  # event file names carry the second they were opened in
    resumed = metrics_lib.Writer(tmp_path, first_step=4)
    for step in range(4, 9):
        resumed.write(step, {"loss": 1.0 / step})
    resumed.close()
    assert [s for _, s, _ in tensorboard_view(tmp_path / "tensorboard")] == list(range(1, 9))


def test_run_paths_keep_uris_and_make_local_ones_absolute(tmp_path, monkeypatch):
    """jaxlm.files: gs:// stays a URI (pathlib would fold it to gs:/...); a relative local
    path is resolved once, so what a run prints can be pasted from anywhere."""
    from jaxlm import files

    assert (
        str(files.path("gs://bucket/runs/7b") / "checkpoints") == "gs://bucket/runs/7b/checkpoints"
    )
    assert not files.is_local("gs://bucket/runs/7b")
    monkeypatch.chdir(tmp_path)
    assert str(files.path("runs/x")) == str(tmp_path / "runs" / "x")
    target = files.path("out/metrics.jsonl")
    target.parent.mkdir(parents=True)
    files.write_atomically(target, "a\n")
    files.write_atomically(target, b"b\n")
    assert target.read_text() == "b\n" and sorted(p.name for p in target.parent.iterdir()) == [
        "metrics.jsonl"
    ]


def test_console_shows_the_validation_loss_before_training(tmp_path, tokenizer_path, capsys):
    train_lib.train(short_run_config(tokenizer_path, 2, eval_every=2), tmp_path)
    out = capsys.readouterr().out
    # The README's "from about 8.4" is this line (also for SFT and LoRA runs: same loop).
    step0 = [line for line in out.splitlines() if line.startswith("step 0/2 | validation loss ")]
    assert len(step0) == 1, out
    assert float(step0[0].rsplit(" ", 1)[1]) > 8.0
    assert out.index(step0[0]) < out.index("step 2/2 |")


def test_run_already_past_train_steps_says_so_and_trains_nothing(tmp_path, tokenizer_path, capsys):
    train_lib.train(short_run_config(tokenizer_path, 2, eval_every=2), tmp_path)
    rows = _metrics(tmp_path)
    capsys.readouterr()
    assert train_lib.train(short_run_config(tokenizer_path, 1, eval_every=2), tmp_path) == {}
    out = capsys.readouterr().out
    assert (
        "the run is already at step 2 of --config.train.steps=1: nothing to train; "
        "raise train.steps to continue"
    ) in out
    assert "step 1/1" not in out and "done:" not in out
    assert _metrics(tmp_path) == rows  # nothing logged again, nothing dropped
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
