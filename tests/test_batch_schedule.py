"""train.batch_schedule: stages by tokens, the learning rate in tokens, the config errors, and
a run killed across stage boundaries that resumes exactly."""

import math
import signal

import numpy as np
import pytest
from test_fault_tolerance import assert_ends_as_unbroken, cli, run_until, tiny_config

from jaxlm import batch_schedule, optim, seq_len_schedule
from jaxlm import config as config_lib
from jaxlm import train as train_lib

# tiny at rows of 64 on 8 devices: 8 rows (512 tokens) per update, one microbatch of 8 rows;
# 16 rows from 1024 tokens, 32 from 2560; 7168 tokens in all.
SCHEDULE = ((0, 8), (1024, 16), (2560, 32))
TOTAL = 7168


def scheduled(config, scaling="none"):
    t = config.train
    t.batch_schedule, t.total_tokens, t.warmup_tokens = SCHEDULE, TOTAL, 1024
    t.batch_lr_scaling = scaling
    return config


def test_stages_start_after_their_threshold_and_the_run_lasts_total_tokens(tokenizer_path):
    config = scheduled(tiny_config(tokenizer_path, 1))
    stages = batch_schedule.stages(config.train, 64)
    # By hand: 2 updates of 512 tokens reach 1024; 2 of 1024 reach 3072 >= 2560; then
    # (7168 - 3072) / 2048 = 2 updates of 2048.
    assert [(s.first_step, s.batch, s.accum_steps, s.tokens_before) for s in stages] == [
        (1, 8, 1, 0),
        (3, 16, 2, 1024),
        (5, 32, 4, 3072),
    ]
    assert batch_schedule.total_steps(config.train, 64) == 6
    assert batch_schedule.with_total_steps(config).train.steps == 6
    every_k = batch_schedule.accum_schedule(config.train, 64)
    assert [int(every_k(n)) for n in range(6)] == [1, 1, 2, 2, 4, 4]


@pytest.mark.parametrize("scaling, power", [("none", 0), ("sqrt", 0.5), ("linear", 1)])
def test_learning_rate_runs_in_tokens_and_scales_with_the_batch(tokenizer_path, scaling, power):
    config = scheduled(tiny_config(tokenizer_path, 1), scaling)
    t = config.train
    lr = optim.schedule(t, 64)
    tokens_before = [0, 512, 1024, 2048, 3072, 5120, 7168]  # before update n + 1
    batch = [8, 8, 16, 16, 32, 32, 32]
    for n, (tokens, b) in enumerate(zip(tokens_before, batch)):
        if tokens < 1024:
            shape = tokens / 1024
        else:
            progress = (tokens - 1024) / (TOTAL - 1024)
            shape = t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        expected = t.lr * (b / 8) ** power * shape
        np.testing.assert_allclose(float(lr(n)), expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("batch_schedule", ((0, 16), (1024, 32)), "(0, train.global_batch_size=8)"),
        ("batch_schedule", ((0, 8), (1024, 12)), "multiple of the first"),
        ("batch_schedule", ((0, 8), (1024, 16), (1024, 32)), "strictly increase"),
        ("batch_schedule", ((0, 8, 1),), "integer pairs"),
        ("total_tokens", 0, "needed with train.batch_schedule"),
        ("warmup_tokens", TOTAL, "below train.total_tokens"),
        ("batch_lr_scaling", "cubic", "one of"),
    ],
)
def test_bad_schedule_is_an_error_naming_the_field(tokenizer_path, field, value, words):
    config = scheduled(tiny_config(tokenizer_path, 1))
    config.train[field] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.train.{field}=") as error:
        config_lib.validate(config, 8)
    assert words in str(error.value)


def test_tokens_without_a_schedule_are_an_error(tokenizer_path):
    config = tiny_config(tokenizer_path, 1)
    config.train.total_tokens = TOTAL
    with pytest.raises(config_lib.ConfigError, match="config.train.total_tokens=7168"):
        config_lib.validate(config, 8)


@pytest.mark.slow  # other processes
def test_killed_across_batch_stages_resumes_exactly(tmp_path, repo, tokenizer_path):
    steps = 6
    config = scheduled(tiny_config(tokenizer_path, 100, every=2))  # steps from total_tokens
    train_lib.train(config, tmp_path / "unbroken")
    command = [
        *cli(tokenizer_path, tmp_path / "killed", 100, every=2),
        f"--config.train.batch_schedule={SCHEDULE}",
        f"--config.train.total_tokens={TOTAL}",
        "--config.train.warmup_tokens=1024",
    ]
    # Killed in stage 2 and in stage 3; each resume starts at an earlier checkpoint and
    # crosses into the next stage again.
    outputs = []
    for pattern in ("step 4/6 | loss", "step 6/6 | loss", None):
        code, output = run_until(command, repo, pattern, timeout=1200)  # a loaded host
        assert code == (-signal.SIGKILL if pattern else 0), output[-3000:]
        outputs.append(output)
    assert "step 3/6 | batch stage 2/3 starts: 16 rows of 64 tokens per update" in outputs[0]
    assert "step 5/6 | batch stage 3/3 starts: 32 rows of 64 tokens per update" in outputs[1]
    # The same params, metrics and data position: 2 x 1 + 2 x 2 + 2 x 4 microbatches, none
    # skipped or repeated at a boundary.
    config.train.steps = steps
    rows = assert_ends_as_unbroken(tmp_path, tmp_path / "killed", steps, config, microbatches=14)
    stage_rows = [(r["step"], r["global_batch_size"]) for r in rows if "batch_stage" in r]
    assert stage_rows == [(1, 8), (3, 16), (5, 32)]  # the first stage starts at step 1


def test_seq_len_stages_start_by_tokens_under_a_batch_schedule(tokenizer_path):
    config = scheduled(tiny_config(tokenizer_path, 1))
    config.data.seq_len_schedule = ((0, 32), (1024, 64), (2048, 64 * 2))
    config.data.seq_len = 128  # rows of 128: updates of 1024, 2048 then 4096 tokens
    config.train.batch_schedule = ((0, 8), (2048, 16), (6144, 32))
    # By hand: 1 update reaches 1024 tokens, 2 reach 2048 (both stages start by tokens)
    assert seq_len_schedule.seq_len_stages(config) == ((0, 32), (1, 64), (2, 128))
    config.data.seq_len_schedule = ((0, 32), (4000, 128))  # within update 3 (2048 -> 4096)
    assert seq_len_schedule.seq_len_stages(config) == ((0, 32), (3, 128))
    config_lib.validate(config, 8)
