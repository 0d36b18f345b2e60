"""Orbax checkpoints: the train state and a JSON record (config, version) saved together.

Saves are asynchronous: training continues while the state is written. Restoring takes
the abstract state with the current shardings, so a checkpoint lands directly sharded.
"""

from __future__ import annotations

import pathlib

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True)
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state):
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
