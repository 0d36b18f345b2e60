"""Tests run on the CPU with 8 simulated devices; set before JAX is imported anywhere."""

import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def repo() -> pathlib.Path:
    return REPO


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    """One tokenizer trained on the built-in corpus, shared by the tests that train."""
    from configs import tiny
    from jaxlm.data import corpus, tokenizer

    config = tiny.get_config()
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    docs = corpus.builtin_documents("train", config.data.val_fraction)
    tokenizer.train(docs, config.model.vocab_size, path, seed=config.seed)
    return str(path)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, tokenizer_path) -> pathlib.Path:
    """A 2-step training run of a small model on an fsdp 4 x tensor 2 mesh, context 64; its
    checkpoint records the tokenizer. Read-only for the tests that share it."""
    from configs import tiny
    from jaxlm import train as train_lib

    config = tiny.get_config()
    config.model.update(dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128))
    config.data.update(dict(tokenizer=tokenizer_path, seq_len=64, eval_batches=1))
    config.train.update(dict(steps=2, global_batch_size=8, warmup_steps=0, eval_every=2))
    config.mesh.update(dict(fsdp=4, tensor=2))
    workdir = tmp_path_factory.mktemp("small_run")
    train_lib.train(config, workdir)
    return workdir


def _record_tolerances(path: str) -> None:
    """Opt-in (JAXLM_TOLERANCE_REPORT=<path>): wrap np.testing.assert_allclose so each call
    appends a JSON line {test, site, atol, rtol, ratio, max_diff}, ratio = max |actual - desired|
    / (atol + rtol |desired|). Issue #25: a bound a test uses most of on one CPU can fail on
    another (a different summation order, AVX-512 or AMX on Intel), so this finds the calls
    that sit close to their bound. Exact comparisons (a zero bound, equal values) are skipped."""
    import json
    import traceback

    import numpy as np

    original = np.testing.assert_allclose

    def recording(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
        try:
            a, d = np.broadcast_arrays(np.asarray(actual, float), np.asarray(desired, float))
            finite = np.isfinite(a) & np.isfinite(d)
            diff, bound = np.abs(a - d)[finite], (atol + rtol * np.abs(d))[finite]
            if diff.size and bound.max() > 0:  # else an exact comparison
                ratio = np.divide(diff, bound, out=np.where(diff > 0, np.inf, 0.0), where=bound > 0)
                stack = traceback.extract_stack()[:-1]
                test = [f for f in stack if os.path.basename(f.filename).startswith("test_")]
                ends = (test[-1:] or stack[-1:]) + stack[-1:]
                sites = dict.fromkeys(f"{os.path.basename(f.filename)}:{f.lineno}" for f in ends)
                row = dict(
                    test=os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0],
                    site=" via ".join(sites), atol=float(np.max(atol)), rtol=float(rtol),
                    ratio=float(ratio.max()), max_diff=float(diff.max()),
                )  # fmt: skip
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")
        except (TypeError, ValueError):
            pass  # not numbers: the original says what is wrong
        return original(actual, desired, rtol, atol, *args, **kwargs)

    np.testing.assert_allclose = recording


if os.environ.get("JAXLM_TOLERANCE_REPORT"):
    _record_tolerances(os.environ["JAXLM_TOLERANCE_REPORT"])
