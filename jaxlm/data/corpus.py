"""The built-in corpus: the `.py` files of the running Python's standard library.

It needs no download, is the same on every machine with the same Python version, and is
real text (about 12 MB of code). Test suites are left out. Its functions also make a small
instruction set (builtin_instructions: docstring -> body) for the SFT demo. Each file is one
document; a document goes to validation when a hash of its relative path says so, so the split is
fixed whatever order the files are found in.
"""

from __future__ import annotations

import ast
import pathlib
import sysconfig
import zlib

SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages"}


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _is_validation(relative_path: str, val_fraction: float) -> bool:
    return zlib.crc32(relative_path.encode()) % 10_000 < val_fraction * 10_000


def _python_files():
    """(relative path, text) of the stdlib's .py files, test suites left out, sorted."""
    root = stdlib_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not SKIPPED_DIRS & set(rel.parts):
            yield rel.as_posix(), path.read_text(encoding="utf-8", errors="replace")


def builtin_instructions(max_chars: int = 800) -> list[dict]:
    """An instruction set with no download: {"prompt": a top-level function's signature and
    docstring, "completion": its body} for each documented stdlib function whose source is at
    most `max_chars` long, in sorted file order (the same for the same Python)."""
    records = []
    for _, text in _python_files():
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):  # a file for another Python version
            continue
        lines = text.splitlines(keepends=True)
        for node in tree.body:
            if not (
                isinstance(node, ast.FunctionDef)
                and ast.get_docstring(node)
                and len(node.body) > 1
                and not node.decorator_list
            ):
                continue
            split = node.body[1].lineno - 1  # the body after the docstring
            prompt = "".join(lines[node.lineno - 1 : split])
            completion = "".join(lines[split : node.end_lineno])
            if completion.strip() and len(prompt) + len(completion) <= max_chars:
                records.append({"prompt": prompt, "completion": completion})
    return records


def builtin_documents(split: str, val_fraction: float) -> list[str]:
    """Texts of the `train` or `validation` documents, in sorted path order."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    docs = [
        text
        for rel, text in _python_files()
        if _is_validation(rel, val_fraction) == (split == "validation")
    ]
    if not docs:
        raise FileNotFoundError(f"no .py files for the {split} split under {stdlib_root()}")
    return docs
