"""The built-in corpus: the `.py` files of the running Python's standard library.

It needs no download, is the same on every machine with the same Python version, and is
real text (about 12 MB of code). Test suites are left out. Each file is one document; a
document goes to validation when a hash of its relative path says so, so the split is
fixed whatever order the files are found in.
"""

from __future__ import annotations

import pathlib
import sysconfig
import zlib

SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages"}


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _is_validation(relative_path: str, val_fraction: float) -> bool:
    return zlib.crc32(relative_path.encode()) % 10_000 < val_fraction * 10_000


def builtin_documents(split: str, val_fraction: float) -> list[str]:
    """Texts of the `train` or `validation` documents, in sorted path order."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    root = stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_DIRS & set(rel.parts):
            continue
        if _is_validation(rel.as_posix(), val_fraction) == (split == "validation"):
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
    if not docs:
        raise FileNotFoundError(f"no .py files for the {split} split under {root}")
    return docs
