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


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node SLURM cluster (tests/slurm_cluster.py), up for the whole session.

    Where SLURM is not installed the tests that use it are skipped with the reason, unless
    JAXLM_REQUIRE_SLURM=1 (.ci/run sets it, after installing SLURM): then they fail.
    """
    from slurm_cluster import SlurmCluster, missing_binaries

    problem = None
    if missing := missing_binaries():
        problem = (f"SLURM binaries not found: {', '.join(missing)} "
                   "(apt-get install slurmctld slurmd slurm-client munge)")
    elif os.geteuid() != 0:
        problem = "slurmd must run as root to start jobs; run the SLURM tests as root"
    if problem:
        if os.environ.get("JAXLM_REQUIRE_SLURM") == "1":
            pytest.fail(f"JAXLM_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(f"{problem}; set JAXLM_REQUIRE_SLURM=1 to make this a failure")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()
