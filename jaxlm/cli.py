"""Command-line flags the CLIs share: `--config=FILE` and its `--config.a.b=value` overrides.

absl and ml_collections report a config file that cannot load, or an override of a field that
does not exist, or a value of the wrong type (`--config.train.steps=abc`), as a traceback;
here each becomes one line naming the flag and the fix.
`python -m jaxlm.train`, `jaxlm.aot` and the benchmarks parse their flags with `parse_flags`.
"""

from __future__ import annotations

import ast
import difflib
import os
import re

import ml_collections
from absl import flags
from ml_collections import config_flags

from jaxlm import config as config_lib


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (pass as `app.run(main, flags_parser=parse_flags)`), with an
    override of a field that does not exist, `--config.train.stepz=3`, or of a value its field
    cannot take, `--config.train.steps=abc`, reported in one line instead of ml_collections'
    traceback."""
    if "config" in flags.FLAGS:
        given = _config_argument(argv)
        path = given or config_flags.get_config_filename(flags.FLAGS["config"])
        problem = config_file_problem(path.split(":", 1)[0])
        if problem:
            default = "" if given else " (the default)"
            raise SystemExit(f"config error: --config={path}{default}: {problem}")
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        overrides = [arg for arg in argv[1:] if arg.startswith("--config.")]
        for arg in overrides:
            unknown = _unknown_field(arg[len("--config.") :].split("=")[0])
            if unknown:
                raise SystemExit(f"config error: {arg.split('=')[0]}: {unknown}") from None
        named = re.search(r"flag --(config\.[\w.]+)=", str(e))
        for arg in overrides:
            name, _, value = arg[2:].partition("=")
            if named and name == named.group(1):
                raise SystemExit(f"config error: --{name}={value}: {_expected(name)}") from None
        if isinstance(e, flags.Error):  # any other flag: absl's own message is one line
            raise SystemExit(f"error: {e}; see --helpshort") from None
        raise


def _config_argument(argv: list[str]) -> str | None:
    """The value of the last --config=PATH (or --config PATH) in argv, if any."""
    value = None
    for i, arg in enumerate(argv[1:], 1):
        name, has_value, rest = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == "config":
            value = rest if has_value else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def config_file_problem(path: str) -> str:
    """Why the config file at `path` cannot load (missing, not Python, no get_config), or "".

    Checked before ml_collections executes it, so each problem is one line, not its
    traceback. An error raised inside get_config() itself still shows its traceback: that
    points at the user's own line.
    """
    where = f" (relative to {os.getcwd()})" if not os.path.isabs(path) else ""
    if not os.path.exists(path):
        return (
            f"no such file{where}; give a config file, e.g. --config=configs/tiny.py "
            "from the repository root"
        )
    if not os.path.isfile(path):
        return "is not a file; give a config file such as configs/tiny.py"
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except SyntaxError as e:
        return f"syntax error at line {e.lineno}: {e.msg}; fix the file"
    except (OSError, ValueError) as e:
        return f"cannot read it ({e}); check the file"
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(alias.name == "*" for alias in node.names):
                return ""  # may bring get_config in; ml_collections will tell
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    if "get_config" not in names:
        return (
            "defines no get_config(); a config file defines get_config() returning "
            "an ml_collections.ConfigDict (see configs/tiny.py)"
        )
    return ""


def _unknown_field(path: str) -> str:
    """Why `path` (e.g. "train.stepz") names no field of the schema, or "" if it does."""
    node = config_lib.default_config()
    for depth, key in enumerate(path.split(".")):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            where = ".".join(path.split(".")[:depth]) or "config"
            known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(key, known, n=1)
            hint = f'did you mean "{close[0]}"?' if close else f"its fields: {', '.join(known)}"
            return f'{where} has no field "{key}"; {hint}'
        node = node[key]
    return ""


_WHAT_TYPES_TAKE = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "text",
    tuple: "a tuple",
}


def _expected(path: str) -> str:
    """What the field at `path` (e.g. "config.train.steps") takes, in words, with its default."""
    section, _, key = path[len("config.") :].rpartition(".")
    node = config_lib.default_config()
    for part in filter(None, section.split(".")):
        node = node[part]
    kind = node.get_type(key)
    words = _WHAT_TYPES_TAKE.get(kind, kind.__name__)
    return f"{path[len('config.') :]} takes {words} (the default is {node[key]!r})"


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def size_in_bytes(value: str, flag: str) -> int:
    """A size such as "5GB" or "500MB" in bytes (decimal units, read as Hugging Face reads them).

    A value that is no size exits with one line naming `flag` and what it takes, instead of
    the traceback the Hugging Face library would raise deep inside the export.
    """
    text = value.strip()
    unit, number = text[-2:].upper(), text[:-2].strip()
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except (KeyError, ValueError, OverflowError):
        size = 0
    if size <= 0:
        raise SystemExit(
            f"error: {flag}={value}: give a positive size in KB, MB, GB or TB, "
            f"e.g. {flag}=5GB or {flag}=500MB"
        )
    return size
