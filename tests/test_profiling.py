"""train.profile_steps: traces of the chosen steps, readable by TensorBoard/xprof and Perfetto."""

import gzip
import json

import pytest
from support import short_run_config

from configs import tiny
from jaxlm import config as config_lib
from jaxlm import train as train_lib


def modules_traced(directory):
    """The XLA programs whose ops ran in the Chrome-format traces under `directory`."""
    traces = list(directory.rglob("*.trace.json.gz"))
    assert traces, f"no trace under {directory}"
    return {
        event.get("args", {}).get("hlo_module")
        for trace in traces
        for event in json.load(gzip.open(trace))["traceEvents"]
    } - {None}


def test_profile_steps_trace_the_train_step_only(tmp_path, tokenizer_path):
    config = short_run_config(tokenizer_path, 5)
    # Step 1 compiles: the window (1, 2) starts after it. Step 2 is also evaluated and saved,
    # after the trace stops.
    config.train.profile_steps = (1, 2)
    config.train.eval_every = config.checkpoint.every = 2
    train_lib.train(config, tmp_path)
    profiles = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert profiles == ["2"]  # named by its first traced step: step 1 compiled
    assert list((tmp_path / "profile" / "2").rglob("*.xplane.pb"))  # TensorBoard / xprof
    assert modules_traced(tmp_path / "profile" / "2") >= {"jit_train_step"}
    assert "jit_eval_step" not in modules_traced(tmp_path / "profile" / "2")


def test_profile_every_repeats_the_window(tmp_path, tokenizer_path):
    config = short_run_config(tokenizer_path, 7)
    config.train.profile_steps, config.train.profile_every = (2, 3), 3
    config.train.eval_every = config.checkpoint.every = 100
    train_lib.train(config, tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "profile").iterdir()) == [2, 5]
    assert "jit_train_step" in modules_traced(tmp_path / "profile" / "5")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("profile_steps", (3, 2), r"train.profile_steps=\(3, 2\) is invalid"),
        ("profile_steps", (0, 2), r"1 <= first <= last"),
        ("profile_every", 5, r"train.profile_every=5 is invalid"),
    ],
)
def test_bad_profile_fields_are_one_line_errors(field, value, message):
    config = tiny.get_config()
    config.train[field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, 8)
