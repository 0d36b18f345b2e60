"""train.batch_schedule = ("adaptive",): the batch doubles where the gradient noise scale
passes the batch, within its ceiling; the decisions are a batch schedule, checkpointed, so a
stopped run resumes onto the same decisions and ends as an unbroken one."""

import copy

import pytest
from test_fault_tolerance import assert_ends_as_unbroken, metric_rows, tiny_config

from jaxlm import adaptive_batch, batch_schedule, seq_len_schedule
from jaxlm import config as config_lib
from jaxlm import train as train_lib

# tiny at rows of 64 on 8 devices: 16 rows (1024 tokens) per update in microbatches of 8 rows,
# doubling up to 64 rows; 14336 tokens in all (6 updates if it doubles after updates 2 and 4).
TOTAL = 14336


def adaptive(config, ratio=1.0):
    t = config.train
    t.batch_schedule, t.global_batch_size, t.grad_accum_steps = ("adaptive",), 16, 2
    t.max_global_batch_size, t.adaptive_batch_ratio = 64, ratio
    t.adaptive_batch_interval = 2  # decisions at most every 2 updates
    t.total_tokens, t.warmup_tokens = TOTAL, 1024
    return config


def test_the_batch_doubles_after_the_noise_scale_passes_it_up_to_the_ceiling(tokenizer_path):
    config = batch_schedule.with_total_steps(adaptive(tiny_config(tokenizer_path, 1)))
    config.data.seq_len_schedule = ((0, 32), (4096, 64))  # by tokens, as the batch stages
    ramp = adaptive_batch.Ramp(config)
    assert config.train.batch_schedule == ((0, 16),) and config.train.steps == 14
    assert seq_len_schedule.seq_len_stages(config)[1] == (4, 64)  # 4 updates of 1024 tokens
    assert ramp.decide(1, 1e9) == ""  # 1 update: fewer than adaptive_batch_interval
    assert ramp.decide(2, 1024.0) == ""  # equal to the batch's 1024 tokens: not past it
    assert ramp.decide(2, None) == ""  # no estimate yet
    line = ramp.decide(2, 1500.0)
    assert line.startswith("step 2/8 | adaptive batch: noise scale 1,500 tokens > 1 x 1,024")
    assert "32 rows per update from step 3 (2,048 tokens consumed)" in line
    # 2 updates of 1024 tokens, then (14336 - 2048) / 2048 = 6 of 2048
    assert config.train.batch_schedule == ((0, 16), (2048, 32))
    assert [s.accum_steps for s in batch_schedule.stages(config.train, 64)] == [2, 4]
    assert seq_len_schedule.seq_len_stages(config)[1] == (3, 64)  # 2 x 1024 + 2048 tokens
    assert ramp.decide(3, 1e9) == ""  # 1 update into the new batch: not settled
    assert ramp.decide(4, 2048.5) != ""  # from 2048 + 2 x 2048 tokens
    assert config.train.batch_schedule == ((0, 16), (2048, 32), (6144, 64))
    assert config.train.steps == 6  # 4 + ceil((14336 - 6144) / 4096)
    capped = batch_schedule.with_total_steps(adaptive(tiny_config(tokenizer_path, 1)))
    capped.train.max_global_batch_size = 32
    low = adaptive_batch.Ramp(capped)
    assert low.decide(2, 1e9) != "" and low.decide(4, 1e9) == ""  # 64 rows would pass 32
    # A resumed run rebuilds the same schedule from the record's decisions.
    again = batch_schedule.with_total_steps(adaptive(tiny_config(tokenizer_path, 1)))
    adaptive_batch.Ramp(again, copy.deepcopy(ramp.state()))
    assert again.train.batch_schedule == config.train.batch_schedule
    assert again.train.steps == config.train.steps


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("max_global_batch_size", 0, "times a power of two"),
        ("max_global_batch_size", 48, "times a power of two"),
        ("max_global_batch_size", 16, "times a power of two"),
        ("grad_accum_steps", 1, "at least 2 with the adaptive ramp"),
        ("adaptive_batch_ratio", 0.0, "above 0"),
        ("adaptive_batch_interval", 0, "at least 1"),
        ("total_tokens", 0, "needed with train.batch_schedule"),
    ],
)
def test_bad_adaptive_settings_name_the_field(tokenizer_path, field, value, words):
    config = adaptive(tiny_config(tokenizer_path, 1))
    config.train[field] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.train.{field}=") as error:
        config_lib.validate(config, 8)
    assert words in str(error.value)
    halves = adaptive(tiny_config(tokenizer_path, 1))  # one microbatch, split in two
    halves.train.grad_accum_steps, halves.train.noise_scale_halves = 1, True
    config_lib.validate(halves, 8)
    plain = tiny_config(tokenizer_path, 1)
    plain.train.max_global_batch_size = 64
    with pytest.raises(config_lib.ConfigError, match="config.train.max_global_batch_size=64"):
        config_lib.validate(plain, 8)


class _StopAt(Exception):
    pass


@pytest.mark.slow  # three short runs of the tiny model
def test_an_adaptive_run_doubles_and_a_stopped_one_resumes_onto_the_same_decisions(
    tmp_path, tokenizer_path, capsys
):
    def config():  # a low ratio: the ramp doubles at the first logged step it can
        c = adaptive(tiny_config(tokenizer_path, 100, every=1, log_every=2), ratio=0.01)
        c.train.eval_every = 100
        return c

    train_lib.train(config(), tmp_path / "unbroken")
    printed = capsys.readouterr().out
    rows = metric_rows(tmp_path / "unbroken")
    stages = [(r["step"], r["global_batch_size"]) for r in rows if "batch_stage" in r]
    # It doubled after updates 2 and 4 (logged steps), then stopped at its ceiling.
    assert stages == [(3, 32), (5, 64)], printed
    assert "adaptive batch: noise scale" in printed
    steps = max(r["step"] for r in rows)
    assert steps == 6  # 2 x 1024 + 2 x 2048 + 2 x 4096 = 14336 tokens: none short, none over
    assert all("gradient_noise_scale" in r for r in rows if "loss" in r)  # what it decided on

    # Stopped by an error after update 3 (checkpoint 3 is on disk; the decision of step 2 is in
    # its record), then resumed with the same command: the same decisions and results.
    def stop(step, _):
        if step == 4:
            raise _StopAt

    stopped = config()
    stopped.train.eval_every = 4
    with pytest.raises(_StopAt):
        train_lib.train(stopped, tmp_path / "resumed", on_validation=stop)
    train_lib.train(config(), tmp_path / "resumed")
    resumed = capsys.readouterr().out
    assert "batch stage 2/2 continues: 32 rows" in resumed, resumed
    unbroken = config()
    unbroken.train.steps = steps
    assert_ends_as_unbroken(tmp_path, tmp_path / "resumed", steps, unbroken, microbatches=28)


@pytest.mark.slow  # a short run of the tiny model
def test_one_microbatch_split_in_halves_drives_the_ramp(tmp_path, tokenizer_path, capsys):
    """train.noise_scale_halves: the noise scale of updates of one microbatch (at first)."""
    config = adaptive(tiny_config(tokenizer_path, 100, every=100, log_every=2), ratio=0.01)
    config.train.grad_accum_steps, config.train.noise_scale_halves = 1, True
    config.train.eval_every = 100
    train_lib.train(config, tmp_path / "run")
    rows = metric_rows(tmp_path / "run")
    assert all(r["gradient_noise_scale"] > 0 for r in rows if "loss" in r), rows
    stages = [(r["step"], r["global_batch_size"]) for r in rows if "batch_stage" in r]
    assert stages == [(3, 32), (5, 64)], capsys.readouterr().out
