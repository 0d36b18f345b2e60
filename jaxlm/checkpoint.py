"""Orbax checkpoints: the train state and a JSON record (config, version, data position).

Saves are asynchronous: training continues while the state is written. orbax writes each
step to a temporary directory and renames it when complete, so a run killed mid-save
leaves the earlier checkpoints untouched and the half-written one is never listed.
Restoring takes the abstract state with the current shardings, so a checkpoint lands
directly sharded on whatever mesh the new run uses. A checkpoint that cannot be read is
reported and the one before it is used. Directories are `etils.epath` paths (through
`jaxlm.files`): local or `gs://`, as orbax takes them.
"""

from __future__ import annotations

import contextlib
import logging as python_logging
import time
import uuid

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jaxlm import files
from jaxlm.errors import CheckpointError


def probe_writable(directory: epath.Path) -> None:
    """Fail at start, not at the first save, when the directory cannot take a file."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{uuid.uuid4().hex}"
        files.write_durably(probe, b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"cannot write checkpoints to {directory}: {e}. Free disk space, fix the "
            "permissions, or choose another --workdir"
        ) from e


ITEMS = ("state", "meta")  # each step: the train state (orbax pytree) and a JSON record


class Checkpointer:
    def __init__(
        self, directory: epath.PathLike, keep: int, keep_every: int = 0, probe: bool = True
    ):
        self.directory = files.path(directory)
        if probe:
            probe_writable(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            create=True,
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
        except Exception as e:  # includes an earlier async save that failed in the background
            raise CheckpointError(
                f"saving checkpoint {step} to {self.directory} failed: {e}. Earlier complete "
                f"checkpoints are intact: {self.all_steps()}"
            ) from e

    def restore(self, step: int, abstract_state):
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def restore_latest_readable(self, abstract_state):
        """(step, state, meta) of the newest checkpoint that reads back, or None if none exist.

        An unreadable one is renamed `<step>.unreadable-<time>` (kept for inspection, and
        out of the way of the step's next save) and the one before it is tried.
        """
        for step in reversed(self.all_steps()):
            try:
                return (step, *self.restore(step, abstract_state))
            except Exception as e:  # corrupt or truncated files: report, set aside, fall back
                aside = self.directory / f"{step}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
                logging.warning(
                    "checkpoint %s cannot be read (%s: %s); moved to %s",
                    self.path(step),
                    type(e).__name__,
                    e,
                    aside,
                )
                print(
                    f"checkpoint {self.path(step)} cannot be read ({type(e).__name__}); kept "
                    f"as {aside.name}; falling back to the one before it",
                    flush=True,
                )
                if jax.process_index() == 0:
                    self.path(step).rename(aside)
                if jax.process_count() > 1:
                    multihost_utils.sync_global_devices(f"jaxlm set aside checkpoint {step}")
                self.manager.reload()
        return None

    def path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"a checkpoint save to {self.directory} failed: {e}") from e

    def close(self) -> None:
        self.wait()
        self.manager.close()


def split_step(path: epath.Path) -> tuple[epath.Path, int | None]:
    """(checkpoints directory, step) of one step's directory; (path, None) otherwise."""
    if (path / "state").is_dir():
        return path.parent, int(path.name)
    return path, None


# What orbax warns on opening a manager read-only: that it turned the saving options off,
# and that the directory is read-only. Both are what we asked for, so nothing to act on.
_READ_ONLY_NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")


class _DropReadOnlyNotices(python_logging.Filter):
    def filter(self, record: python_logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_READ_ONLY_NOTICES)


@contextlib.contextmanager
def _without_read_only_notices():
    """Only those notices, only from absl's logger (where orbax logs), only meanwhile."""
    absl_logger, notices = python_logging.getLogger("absl"), _DropReadOnlyNotices()
    absl_logger.addFilter(notices)
    try:
        yield
    finally:
        absl_logger.removeFilter(notices)


def open_read_only(directory: epath.Path, step: int | None = None):
    """A read-only manager over a checkpoints directory, and `step`, or its newest step when
    none is given (None when it has none). The caller closes the manager."""
    with _without_read_only_notices():
        manager = ocp.CheckpointManager(
            directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True)
        )
    return manager, (manager.latest_step() if step is None else step)


def read_meta(manager, step: int) -> dict:
    """A step's JSON record (config, data position, tokenizer, ...)."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_params(path: epath.PathLike, abstract_params):
    """The params of another run's checkpoint (a run's checkpoints/ dir, or one step in it).

    Only the params are read: the other run's optimizer state and step are left behind.
    """
    path = files.path(path)
    manager, step = open_read_only(*split_step(path))
    if step is None:
        raise CheckpointError(
            f"config.checkpoint.init_from={str(path)!r}: no checkpoint there; "
            "give a run's checkpoints/ directory or one step inside it"
        )
    if read_meta(manager, step).get("lora_base"):
        manager.close()
        raise CheckpointError(
            f"{path} (step {step}) is a LoRA run's: it holds adapters only; "
            "merge them into a plain checkpoint first: python -m jaxlm.convert "
            "--from_run=THAT_RUN --merge_lora --to=NEW_RUN"
        )
    target = {"params": abstract_params}
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            )
        ),
    )
    manager.close()
    return restored["state"]["params"], step
