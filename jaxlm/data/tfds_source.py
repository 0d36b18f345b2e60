"""Text documents from a TFDS dataset, read by index through `tfds.data_source`.

The dataset must already be prepared in ArrayRecord format under TFDS_DATA_DIR (random
access is what makes a global shuffle and exact resume cheap); if it is not, the error
says how to prepare it.
"""

from __future__ import annotations

import os

PREFIX = "tfds:"


def data_dir() -> str | None:
    return os.environ.get("TFDS_DATA_DIR") or None


def _how_to_prepare(name: str) -> str:
    return (
        f'prepare it once with: python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{name}').download_and_prepare(file_format='array_record')\" "
        f"(TFDS_DATA_DIR={data_dir() or '~/tensorflow_datasets'})"
    )


def open_split(name: str, split: str):
    """tfds.data_source(name, split), or a ValueError that says how to prepare it."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir(), download=False)
    except Exception as e:  # tfds raises several kinds; all mean "not readable as is"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{PREFIX}{name} split {split!r} cannot be read: {first_line}; {_how_to_prepare(name)}"
        ) from e


def splits(name: str) -> list[str]:
    """The dataset's split names (train first), checking it is prepared."""
    import tensorflow_datasets as tfds

    try:
        names = list(tfds.builder(name, data_dir=data_dir()).info.splits.keys())
    except Exception as e:
        raise ValueError(
            f"{PREFIX}{name}: {str(e).strip().splitlines()[0]}; {_how_to_prepare(name)}"
        ) from e
    if "train" not in names:
        raise ValueError(
            f"{PREFIX}{name} has no 'train' split (it has {names}); {_how_to_prepare(name)}"
        )
    return names


def text_of(record, text_key: str) -> str | None:
    """The record's text as str (TFDS gives bytes), or None if the key is missing."""
    value = record.get(text_key) if isinstance(record, dict) else None
    if isinstance(value, bytes):
        return value.decode("utf-8")  # UnicodeDecodeError is reported by the caller
    return value if isinstance(value, str) else None
