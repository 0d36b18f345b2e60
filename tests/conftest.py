"""Tests run on the CPU with 8 simulated devices; set before JAX is imported anywhere."""

import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
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
