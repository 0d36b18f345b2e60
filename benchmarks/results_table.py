"""Where every benchmark leaves its numbers: a JSON line with everything, and a Markdown row.

Standard library only: benchmarks.vs_peers imports it from the peers' interpreters too.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import pathlib
import platform
import re


def append(base: pathlib.Path, row: dict, preamble: str, columns: list[str],
           table_rows: list[list]) -> pathlib.Path:
    """Append `row` to <base>.jsonl and `table_rows` to <base>.md.

    A new table starts with `preamble` (a title and what the columns measure) and a header.
    """
    base.parent.mkdir(parents=True, exist_ok=True)
    with open(base.with_suffix(".jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    table = base.with_suffix(".md")
    if not table.exists():
        table.write_text(preamble + "\n\n| " + " | ".join(columns) + " |\n|"
                         + "---|" * len(columns) + "\n")
    with open(table, "a") as f:
        for cells in table_rows:
            f.write("| " + " | ".join(str(c) for c in cells) + " |\n")
    return table


def cpu() -> tuple[str, int, str]:
    """This host's CPU model, its core count, and the slug that names its results files."""
    model = platform.processor() or "cpu"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                     model)
    cores = os.cpu_count()
    return model, cores, re.sub(r"[^a-z0-9]+", "-", f"{model} {cores}c".lower()).strip("-")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write(results_dir: str, stem: str, markdown: str, rows: list[dict]) -> None:
    """The table as `stem`.md (replaced) and every row appended to `stem`.jsonl."""
    out = pathlib.Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown)
    with open(out / f"{stem}.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
