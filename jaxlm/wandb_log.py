"""Weights & Biases (train.wandb_project): the rows metrics.jsonl gets, the config, and the
goodput summary, from process 0, into one W&B run per run directory.

The W&B run's id is kept in the run directory (RUN/wandb_run.json), so a resumed run logs to
the same W&B run. A killed run may have logged rows past its last checkpoint; the resumed run
computes those steps again, bit for bit the same except the fields that time the run
(jaxlm.metrics.WALL_CLOCK_FIELDS), and W&B takes no step twice: those rows are not sent again,
so the curve has each step once.
"""

from __future__ import annotations

import json
import os
import secrets

from etils import epath

from jaxlm import files
from jaxlm import run as run_lib

EXTRA = "pip install 'jaxlm[wandb]'"


class WandbRun:
    """One W&B run, opened (or resumed) for `workdir`."""

    def __init__(self, config, workdir: epath.PathLike):
        import wandb  # the [wandb] extra; jaxlm.config_checks stops without it

        t, workdir = config.train, epath.Path(workdir)
        self.workdir = workdir
        earlier = run_lib.wandb_state(workdir)
        self.run_id = earlier.get("id") or secrets.token_hex(4)  # W&B: 8 chars, [a-z0-9]
        self.logged_before = earlier.get("last_step", -1)  # the steps W&B has already
        local = not str(workdir).startswith(("gs://", "s3://"))
        self.run = wandb.init(
            project=t.wandb_project,
            entity=t.wandb_entity or None,
            name=t.wandb_name or workdir.name,
            tags=list(t.wandb_tags),
            mode=t.wandb_mode,
            id=self.run_id,
            resume="allow",
            config=config.to_dict(),
            dir=os.fspath(workdir) if local else None,
        )
        self.last_step = self.logged_before
        self._save_state()

    def _save_state(self) -> None:
        state = {"id": self.run_id, "last_step": self.last_step}
        files.write_atomically(self.workdir / run_lib.WANDB_RUN, json.dumps(state) + "\n")

    def write(self, step: int, row: dict) -> None:
        if step <= self.logged_before:  # a killed attempt logged it already
            return
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if step != self.last_step:
            self.last_step = step
            self._save_state()

    def close(self, summary: dict) -> None:
        """The goodput account into the run's summary, then finish."""
        self.run.summary.update(summary)
        self.run.finish()
