"""The arrows of DESIGN.md point one way: checked, not just drawn.

The data package knows nothing of the model or the config module (its errors come from the
`jaxlm.errors` leaf), so importing it loads neither them nor the attention kernels. Attention
and the loss take the mesh from the context they are traced in: neither they nor the data
package import `jaxlm.sharding` or `jaxlm.config`.
"""

import ast
import json
import os
import subprocess
import sys

import pytest

# What importing the data package must not load: the model and all it pulls in (attention,
# its kernels and Pallas), the config module (which imports the model), and the train step.
NOT_FOR_DATA = (
    "jaxlm.model",
    "jaxlm.config",
    "jaxlm.attention",
    "jaxlm.context_parallel",
    "jaxlm.ring_kernels",
    "jaxlm.step",
    "jax.experimental.pallas",
)

# Modules that import neither jaxlm.sharding nor jaxlm.config; globbed, so a module that does
# not exist (yet, or any more) is simply not checked.
MESH_FREE = (
    "jaxlm/attention.py",
    "jaxlm/attention_*.py",
    "jaxlm/attention/**/*.py",
    "jaxlm/loss.py",
    "jaxlm/ring_kernels.py",
    "jaxlm/context_parallel.py",
    "jaxlm/data/**/*.py",
)
NOT_FOR_MESH_FREE = ("jaxlm.sharding", "jaxlm.config")

_IMPORT_AND_REPORT = """
import importlib, json, sys
forbidden = json.loads(sys.argv[1])
loaded, seen = {}, set()
for name in sys.argv[2:]:
    importlib.import_module(name)
    now = {f for f in forbidden if any(m == f or m.startswith(f + ".") for m in sys.modules)}
    loaded[name], seen = sorted(now - seen), seen | now
print(json.dumps(loaded))
"""


def _data_modules(repo) -> list[str]:
    paths = sorted((repo / "jaxlm" / "data").glob("*.py"))
    names = [".".join(p.relative_to(repo).with_suffix("").parts) for p in paths]
    return [n.removesuffix(".__init__") for n in names]


def test_importing_the_data_package_loads_no_model_config_or_kernels(repo):
    """Each module of jaxlm.data, imported in turn in a fresh interpreter, `jaxlm.data` first
    (not just `jaxlm`, whose names may load lazily)."""
    modules = _data_modules(repo)
    assert modules[0] == "jaxlm.data"
    assert {"jaxlm.data.pipeline", "jaxlm.data.prepare"} <= set(modules)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_AND_REPORT, json.dumps(NOT_FOR_DATA), *modules],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    culprits = {name: new for name, new in loaded.items() if new}
    assert not culprits, f"importing these (in this order) loaded what data must not: {culprits}"


def _imported_modules(path, repo) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth (function-level
    imports count too); for `from X import y` both X and X.y, since y may be a module."""
    package = list(path.relative_to(repo).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, one level up per extra dot
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, *filter(None, [node.module])])
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def test_the_layering_check_sees_every_form_of_import(tmp_path):
    package = tmp_path / "jaxlm" / "attention"
    package.mkdir(parents=True)
    (package / "kernel.py").write_text(
        "import jaxlm.sharding\nfrom jaxlm import config as c\nfrom jaxlm.config import X\n"
        "from .. import sharding\nfrom ..config import Y\nfrom . import splash\n"
        "def f():\n    from jaxlm import sharding as s\n"
    )
    found = _imported_modules(package / "kernel.py", tmp_path)
    names = [name for _, name in found]
    assert sorted({line for line, name in found if _is_forbidden(name)}) == [1, 2, 3, 4, 5, 8]
    assert "jaxlm.attention.splash" in names


def _is_forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in NOT_FOR_MESH_FREE)


@pytest.mark.parametrize("pattern", MESH_FREE)
def test_kernels_loss_and_data_import_neither_sharding_nor_config(pattern, repo):
    """Checked on the source (ast), so a function-level import counts as much as a top one."""
    offenders = {
        f"{path.relative_to(repo)}:{line}": name
        for path in sorted(repo.glob(pattern))
        for line, name in _imported_modules(path, repo)
        if _is_forbidden(name)
    }
    assert not offenders, "\n".join(f"{at} imports {name}" for at, name in offenders.items())
