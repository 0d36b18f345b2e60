"""data.seq_len_schedule: short rows first, then longer, at constant tokens per step."""

import collections
import json

import numpy as np
import pytest

from configs import tiny
from jaxlm import config as config_lib
from jaxlm import kernel_choice, optim, seq_len_schedule
from jaxlm import metrics as metrics_lib
from jaxlm import step as step_lib
from jaxlm import train as train_lib
from jaxlm.data import pipeline

FIELD = "config.data.seq_len_schedule="

BAD = [
    # (schedule, other changes, words the message must contain besides the field)
    (((1, 128), (10, 256)), {}, ["first stage must start at 0"]),
    (((0, 64), (10, 128), (10, 256)), {}, ["start_steps must strictly increase"]),
    (((0, 128), (10, 64), (20, 256)), {}, ["lengths must strictly increase"]),
    (((0, 64), (10, 128)), {}, ["last length must be data.seq_len=256"]),
    (((0, 96), (10, 256)), {}, ["length 96", "divide data.seq_len=256"]),
    (((0, 1), (10, 256)), {}, ["length 1 must be at least 2"]),
    (
        ((0, 2), (10, 256)),
        {"mesh.sequence": 4, "mesh.fsdp": 2},
        ["length 2", "2 * mesh.sequence=4"],
    ),
    (((0, 2), (10, 256)), {"train.loss_chunks": 4}, ["length 2", "train.loss_chunks=4"]),
    (
        ((0, 8), (10, 256)),
        {"train.loss_chunks": 8, "mesh.sequence": 2, "mesh.fsdp": 4},
        ["length 8", "train.loss_chunks=8", "mesh.sequence=2"],
    ),
    (((0,), (10, 256)), {}, ["(start_step, seq_len) integer pairs"]),
    (
        ((0, 64), (10, 256)),
        {"model.attention": "splash", "model.splash_block_kv": 512},
        ["length 64", "splash", "model.splash_block_kv=512"],
    ),
]


def _config(schedule, **changes):
    config = tiny.get_config()  # data.seq_len 256
    config.data.seq_len_schedule = schedule
    for dotted, value in changes.items():
        section, field = dotted.split(".")
        config[section][field] = value
    return config


@pytest.mark.parametrize("schedule,changes,words", BAD)
def test_bad_schedule_names_the_field(schedule, changes, words):
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(_config(schedule, **changes), 8)
    message = str(error.value)
    assert message.startswith(FIELD), message
    for word in words:
        assert word in message, (word, message)


def test_stages_and_auto_attention():
    config = _config(((0, 128), (3, 256)), **{"model.attention": "auto"})
    shape = config_lib.validate(config, 8).mesh_shape
    stages = seq_len_schedule.seq_len_stages(config)
    assert stages == ((0, 128), (3, 256))
    # A stage starts after start_step updates: updates 1-3 at 128, 4 on at 256.
    assert [seq_len_schedule.stage_at(stages, step) for step in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert seq_len_schedule.seq_len_stages(tiny.get_config()) == ((0, 256),)
    assert kernel_choice.attention_impl(config, shape, "tpu") == "splash"
    config.data.seq_len_schedule = ((0, 64), (3, 256))  # 64 fits no 128-key splash tile
    assert kernel_choice.attention_impl(config, shape, "tpu") == "xla"


def test_cut_rows_are_the_rows_packed_at_the_shorter_length():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 500, size=rng.integers(2, 90)) for _ in range(60)]
    long_rows, short_rows = pipeline.PackedRows(docs, 64, seed=5), pipeline.PackedRows(docs, 16, 5)
    batch = {k: np.stack([long_rows[i][k] for i in range(len(long_rows))]) for k in long_rows[0]}
    # Some padding, and rows that pack several documents.
    assert (batch["segment_ids"] == 0).any() and (batch["segment_ids"] > 2).any()
    cut = pipeline.cut_rows(batch, 16)
    assert cut["inputs"].shape == (4 * len(long_rows), 16)
    for k in batch:
        expected = np.stack([short_rows[i][k] for i in range(4 * len(long_rows))])
        np.testing.assert_array_equal(cut[k], expected, err_msg=k)
    assert pipeline.cut_rows(batch, 64) is batch


def small_tiny(tokenizer_path, schedule, steps):
    """configs/tiny.py shrunk to compile fast; 16 rows of 64 a step at the end, 2 microbatches."""
    config = tiny.get_config()
    m = config.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 64, 1, 4, 2, 128
    config.data.tokenizer, config.data.seq_len = tokenizer_path, 64
    config.data.seq_len_schedule = schedule
    config.data.eval_batches = 1
    t = config.train
    t.steps, t.global_batch_size, t.grad_accum_steps = steps, 16, 2
    t.warmup_steps, t.log_every = 1, 1
    config.checkpoint.every = 100
    return config


def test_training_runs_each_stage_at_its_length(tmp_path, tokenizer_path, monkeypatch, capsys):
    traced, calls, in_train = collections.Counter(), [], [False]
    real_loss, real_make = step_lib.loss_sum_and_count, step_lib.make_train_step

    def counting_loss(model, params, batch, loss_chunks=1):
        # Python runs here once per trace (= compile)
        traced["train" if in_train[0] else "eval", batch["inputs"].shape] += 1
        return real_loss(model, params, batch, loss_chunks)

    def recording_make(factory):
        step = real_make(factory)

        def recorded(state, batch, *window):  # window: the targets and microbatches
            calls.append(batch["inputs"].shape)
            in_train[0] = True
            try:
                return step(state, batch, *window)
            finally:
                in_train[0] = False

        return recorded

    monkeypatch.setattr(step_lib, "loss_sum_and_count", counting_loss)
    monkeypatch.setattr(step_lib, "make_train_step", recording_make)
    monkeypatch.setattr(metrics_lib, "peak_flops_total", lambda devices: (1e12, "test"))
    config = small_tiny(tokenizer_path, ((0, 16), (2, 32), (4, 64)), steps=6)
    train_lib.train(config, tmp_path)

    # Two microbatches per step; rows scale inversely with the length: 16 x 64 tokens a step.
    lengths = {1: 16, 2: 16, 3: 32, 4: 32, 5: 64, 6: 64}
    assert calls == [(8 * 64 // lengths[s], lengths[s]) for s in range(1, 7) for _ in range(2)]
    assert all(2 * rows * length == 16 * 64 for rows, length in calls)
    # Each stage compiled once.
    assert {shape: n for (kind, shape), n in traced.items() if kind == "train"} == {
        (32, 16): 1,
        (16, 32): 1,
        (8, 64): 1,
    }
    assert {shape for kind, shape in traced if kind == "eval"} == {(8, 64)}  # at data.seq_len

    out = capsys.readouterr().out
    for line in (
        "step 1/6 | seq_len stage 1/3 starts: 64 rows of 16 tokens per step",
        "step 3/6 | seq_len stage 2/3 starts: 32 rows of 32 tokens per step",
        "step 5/6 | seq_len stage 3/3 starts: 16 rows of 64 tokens per step",
    ):
        assert line in out, out[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["seq_len"], r["rows_per_step"]) for r in rows if "seq_len" in r] == [
        (1, 16, 64),
        (3, 32, 32),
        (5, 64, 16),
    ]
    # MFU counts the FLOPs of the current length (peak 1e12 here); a stage's first step
    # compiles and is not timed.
    timed = {r["step"]: r["mfu"] * 1e12 / r["tokens_per_second"] for r in rows if "mfu" in r}
    assert sorted(timed) == [2, 4, 6]
    head_dim = config.model.d_model // config.model.n_heads
    for step, per_token in timed.items():
        expected = metrics_lib.flops_per_token(config.model, head_dim, lengths[step])
        assert per_token == pytest.approx(expected, rel=1e-9)
    # The learning rate runs on by optimizer step, whatever the stage.
    schedule = optim.schedule(config.train)
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx(
        [float(schedule(s - 1)) for s in range(1, 7)]
    )
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


@pytest.mark.slow
def test_schedule_over_a_split_sequence_trains_as_on_one_device(tmp_path, tokenizer_path):
    """The real loop with the sequence split over 2 devices (ring) and a schedule: the same
    per-step losses as on one device (fsdp only), stage after stage."""
    losses = {}
    for name, mesh in (("one", {"fsdp": -1}), ("ring", {"fsdp": 4, "sequence": 2})):
        config = small_tiny(tokenizer_path, ((0, 32), (2, 64)), steps=3)
        config.mesh.update(mesh)
        config.model.context_parallel = "ring"
        train_lib.train(config, tmp_path / name)
        rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        losses[name] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["one"]) == 3
    np.testing.assert_allclose(losses["ring"], losses["one"], rtol=1e-5)
