"""Text documents out of the files a user has: .txt, .jsonl, source code and markup (one
document per file, as .txt), each optionally .gz or .zst; any other text file by
`--format=text`.

Every document comes with where it came from (`file:line`), and every document that
cannot be used is counted under a reason with its first few locations, so `prepare` can
say exactly what it skipped instead of failing later with a shape error or a hang.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from typing import IO

SKIP_REASONS = {
    "empty_file": "empty file",
    "empty_document": "document with no text",
    "invalid_utf8": "not valid UTF-8",
    "invalid_json": "not a JSON object",
    "missing_key": "JSON line without the text key (or not a string)",
    "too_long": "longer than --max_document_chars",
    # SFT records (jaxlm.data.sft)
    "no_messages": "SFT record without messages (or prompt and completion)",
    "bad_message": "SFT message that is not {role: str, content: str}",
    "unknown_role": "SFT message whose role is not system, user or assistant",
    "empty_assistant": "SFT record with an empty assistant turn (or completion)",
    "no_assistant": "SFT record without an assistant turn",
    "turn_order": "SFT record whose turns the chat template cannot lay out (llama2: "
    "user and assistant alternating after an optional system)",
}
EXAMPLES_KEPT = 5
TXT_MODES = ("file", "blank_line")
# How a file is read: "auto" by its extension, "text" like a .txt, "jsonl" a JSON object a line.
FORMATS = ("auto", "text", "jsonl")
# Read as text (like .txt) by their extension: prose, markup and source code, whose usual
# corpus unit is the file. Anything else needs --format=text (e.g. a Makefile).
TEXT_EXTENSIONS = (
    ".txt",
    ".text",
    ".md",
    ".markdown",
    ".rst",
    ".tex",
    ".org",
    ".adoc",
    ".py",
    ".pyi",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".cxx",
    ".hh",
    ".hpp",
    ".hxx",
    ".cu",
    ".cuh",
    ".java",
    ".kt",
    ".scala",
    ".js",
    ".jsx",
    ".mjs",
    ".ts",
    ".tsx",
    ".go",
    ".rs",
    ".rb",
    ".php",
    ".swift",
    ".cs",
    ".hs",
    ".ml",
    ".lua",
    ".pl",
    ".r",
    ".jl",
    ".sh",
    ".bash",
    ".sql",
    ".html",
    ".css",
    ".xml",
    ".yaml",
    ".yml",
    ".toml",
    ".proto",
    ".zig",
    ".dart",
    ".ex",
    ".erl",
    ".clj",
    ".el",
    ".f90",
    ".v",
    ".sv",
)


@dataclasses.dataclass
class Skipped:
    """Counts per reason, and the first few `file:line` of each."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < EXAMPLES_KEPT:
            self.examples[reason].append(where)

    def merge(self, other: dict) -> None:
        for reason, count in other["counts"].items():
            self.counts[reason] += count
            kept = self.examples.setdefault(reason, [])
            kept.extend(other["examples"].get(reason, [])[: EXAMPLES_KEPT - len(kept)])

    def to_json(self) -> dict:
        return {"counts": dict(self.counts), "examples": self.examples}

    def report(self) -> list[str]:
        return [
            f"skipped {count:,} x {SKIP_REASONS[reason]} (e.g. {', '.join(self.examples[reason])})"
            for reason, count in sorted(self.counts.items())
        ]


def expand(patterns: list[str], flag: str = "--input") -> list[str]:
    """Sorted files matching the glob patterns; a pattern matching nothing is an error naming
    the command's `flag`."""
    files = []
    for pattern in patterns:
        matched = sorted(
            p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
        )
        if not matched:
            raise FileNotFoundError(f"{flag}={pattern!r} matches no file")
        files.extend(matched)
    return sorted(set(files))


def _open_binary(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise ImportError(
                f"{path}: reading .zst needs the zstandard package: pip install zstandard"
            ) from e
        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        )
    return open(path, "rb")


def format_of(path: str, input_format: str = "auto") -> str:
    """ "txt" or "jsonl": how `path` is read, by `input_format` or else by its extension."""
    if input_format not in FORMATS:
        raise ValueError(f"--format={input_format!r}; use one of {FORMATS}")
    if input_format != "auto":
        return "txt" if input_format == "text" else input_format
    name = path.removesuffix(".gz").removesuffix(".zst").lower()
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(TEXT_EXTENSIONS):
        return "txt"
    raise ValueError(
        f"{path}: unknown input format; use .txt, .jsonl or a source file such as "
        ".py or .md (optionally .gz or .zst), or read any text file with "
        "--format=text"
    )


def _decode(raw: bytes, path: str, line: int, skipped: Skipped) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        newlines = raw[: e.start].count(b"\n")
        skipped.add("invalid_utf8", f"{path}:{line + newlines}")
        return None


def json_records(path: str, skipped: Skipped) -> Iterator[tuple[dict, str]]:
    """(JSON object, 'file:line') for each line of a .jsonl file that is one; the rest (bad
    UTF-8, bad JSON, not an object) go to `skipped`, as does a file with no bytes at all."""
    any_bytes = False
    with _open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            any_bytes = True
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            line = _decode(raw, path, number, skipped)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped.add("invalid_json", where)
                continue
            if not isinstance(record, dict):
                skipped.add("invalid_json", where)
                continue
            yield record, where
    if not any_bytes:
        skipped.add("empty_file", path)


def read(
    path: str,
    text_key: str = "text",
    txt_mode: str = "file",
    max_chars: int = 10_000_000,
    skipped: Skipped | None = None,
    input_format: str = "auto",
) -> Iterator[tuple[str, str]]:
    """(text, 'file:line') for each usable document of `path`; the rest go to `skipped`.
    `input_format` (see FORMATS) overrides what the extension says."""
    skipped = skipped if skipped is not None else Skipped()
    if txt_mode not in TXT_MODES:
        raise ValueError(f"--txt_mode={txt_mode!r}; use one of {TXT_MODES}")
    kind, any_bytes = format_of(path, input_format), False

    def usable(text: str | None, where: str) -> bool:
        if text is None:
            return False
        if not text.strip():
            skipped.add("empty_document", where)
            return False
        if len(text) > max_chars:
            skipped.add("too_long", where)
            return False
        return True

    if kind == "jsonl":
        for record, where in json_records(path, skipped):
            text = record.get(text_key)
            if not isinstance(text, str):
                skipped.add("missing_key", where)
            elif usable(text, where):
                yield text, where
        return
    with _open_binary(path) as f:
        if txt_mode == "file":
            raw = f.read()
            any_bytes = bool(raw)
            text = _decode(raw, path, 1, skipped) if raw else None
            if text is not None and usable(text, f"{path}:1"):
                yield text, f"{path}:1"
        else:  # blank_line: paragraphs separated by one or more blank lines
            lines, first, valid = [], 0, True
            for number, raw in enumerate(f, 1):
                any_bytes = True
                if not raw.strip():
                    if lines and valid and usable("".join(lines), f"{path}:{first}"):
                        yield "".join(lines).rstrip("\n"), f"{path}:{first}"
                    lines, valid = [], True
                    continue
                if not lines:
                    first = number
                line = _decode(raw, path, number, skipped)
                valid = valid and line is not None
                lines.append(line or "")
            if lines and valid and usable("".join(lines), f"{path}:{first}"):
                yield "".join(lines).rstrip("\n"), f"{path}:{first}"
    if not any_bytes:
        skipped.add("empty_file", path)
