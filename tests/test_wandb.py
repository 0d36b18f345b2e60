"""train.wandb_project: the rows metrics.jsonl gets go to one W&B run, across resumes, each
step once. Run in W&B's offline mode: no network."""

import json
import shutil
import sys

import pytest
from support import short_run_config
from wandb_records import history, run_ids

from configs import tiny
from jaxlm import config as config_lib
from jaxlm import train as train_lib


def _config(tokenizer_path, steps):
    config = short_run_config(tokenizer_path, steps)
    config.checkpoint.every = 2
    config.train.update(dict(wandb_project="jaxlm-test", wandb_mode="offline", eval_every=2))
    return config


def test_resumed_runs_log_to_one_wandb_run_without_repeating_a_step(
    tmp_path, tokenizer_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    class Dies(train_lib.pipeline.Batches):
        def __next__(self):
            if self.get_state()["next_index"] == 5:  # step 6's batch, dispatched in step 5
                raise RuntimeError("killed")
            return super().__next__()

    with monkeypatch.context() as patch:
        patch.setattr(train_lib.pipeline, "Batches", Dies)
        with pytest.raises(RuntimeError, match="killed"):
            train_lib.train(_config(tokenizer_path, 6), tmp_path)
    # As if killed after logging step 4 but before its checkpoint was complete: the next
    # attempt resumes at 2 and computes steps 3 and 4 again.
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    train_lib.train(_config(tokenizer_path, 6), tmp_path)

    run_id = json.loads((tmp_path / "wandb_run.json").read_text())["id"]
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(run_ids(f) == {run_id} for f in files)
    logged = [(step, row) for f in files for step, row in history(f)]
    steps = [step for step, _ in logged]
    assert steps == sorted(set(steps)) == [0, 1, 2, 3, 4, 5, 6]  # each once, in order
    wandb_loss = {step: row["loss"] for step, row in logged if "loss" in row}
    jsonl = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert wandb_loss == {r["step"]: r["loss"] for r in jsonl if "loss" in r}
    assert all("goodput" in row for step, row in logged if "loss" in row)


def test_wandb_project_without_the_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    config = tiny.get_config()
    config.train.wandb_project = "p"
    with pytest.raises(config_lib.ConfigError, match=r"pip install 'jaxlm\[wandb\]'"):
        config_lib.validate(config, 8)
