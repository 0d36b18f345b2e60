"""Where every benchmark leaves its numbers: a JSON line with everything, and a Markdown table.

`record()` is the one writer; a results file is extended, replaced, or given a section per run.

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


def markdown_table(columns: list[str], cells: list[list], spaced_rule: bool = False) -> str:
    """A Markdown table, header first, each line ending in a newline. `spaced_rule` writes the
    header's rule as `| --- |` (the whole-file tables), else `|---|` (the appended ones):
    each results file keeps the form it was first written in."""
    rule = (
        "| " + " | ".join(["---"] * len(columns)) + " |"
        if spaced_rule
        else "|" + "---|" * len(columns)
    )
    return (
        "| "
        + " | ".join(columns)
        + " |\n"
        + rule
        + "\n"
        + "".join(_table_row(row) for row in cells)
    )


def _table_row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |\n"


def record(
    base: str | os.PathLike,
    rows: list[dict],
    preamble: str,
    columns: list[str],
    cells: list[list],
    *,
    mode: str = "extend",
    title: str = "",
    footer: str = "",
    spaced_rule: bool = False,
) -> pathlib.Path:
    """Append every row to <base>.jsonl and the table of `cells` to <base>.md, returned; one of:

    - "extend": the file holds one table that every run extends; a new file starts with
      `preamble` (a title and what the columns measure) and the header.
    - "replace": the file is this run's: `preamble`, the table, then `footer`.
    - "section": the file is `title`, then a section per run: `preamble` (its heading and
      settings) and its own table.
    """
    if mode not in ("extend", "replace", "section"):
        raise ValueError(f"mode={mode!r}: one of 'extend', 'replace', 'section'")
    base = pathlib.Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    with open(base.with_suffix(".jsonl"), "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    table = base.with_suffix(".md")
    whole = preamble + "\n\n" + markdown_table(columns, cells, spaced_rule)
    if mode == "replace":
        table.write_text(whole + footer)
    elif mode == "section":
        if not table.exists():
            table.write_text(title)
        with open(table, "a") as f:
            f.write(whole)
    elif not table.exists():
        table.write_text(whole)
    else:
        with open(table, "a") as f:
            f.write("".join(_table_row(row) for row in cells))
    return table


def cpu() -> tuple[str, int, str]:
    """This host's CPU model, its core count, and the slug that names its results files."""
    model = platform.processor() or "cpu"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next(
            (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model
        )
    cores = os.cpu_count()
    return model, cores, re.sub(r"[^a-z0-9]+", "-", f"{model} {cores}c".lower()).strip("-")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def worker_lines(module: str, flags: list[str], what: str) -> list[dict]:
    """Run `python -m module *flags` (one side of a comparison, in a fresh process) and read
    the JSON lines it printed; exit with its stderr's tail, naming `what`, if it failed."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", module, *flags], capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"{what} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
