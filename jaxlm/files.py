"""Paths on a local disk or on cloud storage (`gs://bucket/...`), one way for both.

jaxlm reads and writes its files (checkpoints, metrics, tokenizer, config dumps) through
`etils.epath`, the layer orbax itself uses: a `gs://` workdir works as a local one does,
through tf.io.gfile when TensorFlow is installed, else fsspec (gcsfs). Local paths are made
absolute, so what a run prints can be pasted from any directory; URIs are kept as given.
"""

from __future__ import annotations

import os

from etils import epath

from jaxlm.errors import PathError


def is_local(path: epath.PathLike) -> bool:
    return "://" not in os.fspath(path)


def path(value: epath.PathLike) -> epath.Path:
    """An epath.Path for `value`, absolute when local."""
    p = epath.Path(value)
    return p.expanduser().absolute() if is_local(p) else p


def make_dir(value: epath.PathLike, flag: str) -> epath.Path:
    """Create the directory `value` (given as `flag`), or say in one line why it cannot be one:
    a file in the way, or a place that cannot be written (a read-only mount)."""
    directory = path(value)
    if directory.exists() and not directory.is_dir():
        raise PathError(
            f"{flag}={directory} is a file, not a directory; give a new "
            "directory, or an earlier one to reuse it"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PathError(
            f"{flag}={directory} cannot be created ({e.strerror or e}); choose a "
            "directory you can write to"
        ) from e
    return directory


def output_file(value: epath.PathLike, flag: str) -> epath.Path:
    """The file `flag` names, checked before the work whose result it takes: not a directory,
    and its directory created."""
    out = path(value)
    if out.is_dir():
        raise PathError(
            f"{flag}={value} is a directory; give a file name, e.g. {flag}={out / 'results.jsonl'}"
        )
    make_dir(out.parent, f"{flag}'s directory")
    return out


def write_durably(target: epath.Path, data: bytes) -> None:
    """Write `data` to `target` and, on a local disk, fsync it: a full disk shows here
    (delayed allocation can hide it until then), not at some later save."""
    if is_local(target):
        with open(os.fspath(target), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    else:
        target.write_bytes(data)


def write_atomically(target: epath.Path, data: str | bytes) -> None:
    """Write then rename, so a reader never sees half a file (a copy then a delete on
    object stores, where a rename is not atomic but the copy only appears whole)."""
    tmp = target.with_name(target.name + ".tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    tmp.replace(target)
