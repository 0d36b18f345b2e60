"""What a newcomer sees on the console: no libtpu error block on a CPU host, and a bad flag
value is one line naming the flag, not a traceback. Each runs a command in a subprocess."""

import importlib.util
import os
import subprocess
import sys

import pytest

from jaxlm import cli, platforms

LIBTPU_NOISE = (
    "unexpected worker hostname",
    "jellyfish",
    "E0000",
    "TPU_WORKER_HOSTNAMES",
    "libtpu_init_utils",
)


def _run(repo, *command, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=repo,
        env=env,
    )


def _env_choosing_no_platform(repo):
    """The environment of a user who set nothing: no JAX_PLATFORMS (conftest sets it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT")}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    env["XLA_FLAGS"] = ""
    return env


def _skip_unless_libtpu_on_a_plain_cpu_host():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): its noise cannot occur")
    if platforms.tpu_may_be_attached() or platforms._gpu_visible():
        pytest.skip("this host has a TPU or a GPU: JAX's own platform choice stands here")


def test_a_cpu_host_with_libtpu_starts_jax_without_the_tpu_runtime(repo):
    _skip_unless_libtpu_on_a_plain_cpu_host()
    code = (
        "from jaxlm import platforms; platforms.skip_absent_tpu(); import jax; "
        "print(jax.devices()[0].platform)"
    )
    result = _run(repo, "-c", code, env=_env_choosing_no_platform(repo))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "cpu"
    for noise in LIBTPU_NOISE:
        assert noise not in result.stderr, result.stderr[-2000:]


def test_skip_absent_tpu_leaves_a_platform_the_user_chose(repo):
    code = (
        "import os; from jaxlm import platforms; print(platforms.skip_absent_tpu(), "
        "os.environ.get('JAX_PLATFORMS'))"
    )
    for chosen in ({"JAX_PLATFORMS": ""}, {"JAX_PLATFORMS": "cpu"}, {"JAX_FORCE_TPU_INIT": "1"}):
        env = {**_env_choosing_no_platform(repo), **chosen}
        result = _run(repo, "-c", code, env=env)
        assert result.stdout.split()[0] == "False", (chosen, result.stdout, result.stderr[-2000:])
        assert os.environ.get("JAX_PLATFORMS") == "cpu"  # the test's own, untouched


@pytest.mark.slow
def test_train_on_a_cpu_host_with_libtpu_prints_no_libtpu_errors(repo, tmp_path):
    _skip_unless_libtpu_on_a_plain_cpu_host()
    result = _run(
        repo,
        "-m",
        "jaxlm.train",
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.train.steps=1",
        "--config.model.n_layers=1",
        "--config.train.eval_every=1",
        env=_env_choosing_no_platform(repo),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 1/1" in result.stdout
    for noise in LIBTPU_NOISE:
        assert noise not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize(
    "override, words",
    [
        ("--config.train.steps=abc", ["train.steps takes a whole number", "1000"]),
        ("--config.train.steps=1.5", ["train.steps takes a whole number"]),
        ("--config.train.lr=fast", ["train.lr takes a number"]),
        ("--config.model.float32_attention_scores=maybe", ["takes true or false"]),
    ],
)
def test_a_config_value_of_the_wrong_type_is_one_line_naming_the_flag(
    override, words, repo, tmp_path
):
    result = _run(
        repo,
        "-m",
        "jaxlm.train",
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'run'}",
        override,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {override}: "), lines
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "run").exists()


def test_another_bad_flag_of_a_config_cli_is_one_line(repo, tmp_path):
    result = _run(
        repo,
        "-m",
        "jaxlm.train",
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'run'}",
        "--no_such_flag=1",
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: Unknown command line flag 'no_such_flag'; see --helpshort"
    ]


@pytest.mark.parametrize("size", ["five", "5", "0GB", "-1MB", "5 PB"])
def test_a_bad_max_shard_size_is_one_line_naming_the_flag(size, repo, tmp_path):
    result = _run(
        repo,
        "-m",
        "jaxlm.convert",
        f"--from_run={tmp_path / 'run'}",
        f"--to_hf={tmp_path / 'hf'}",
        f"--max_shard_size={size}",
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --max_shard_size={size}: "), lines
    assert "e.g. --max_shard_size=5GB" in lines[0]
    assert not (tmp_path / "hf").exists()


def test_sizes_read_as_hugging_face_reads_them():
    """Decimal units, a number and a unit with or without a space, any case: as
    huggingface_hub's parse_size_to_int, so a size that worked before still does."""
    sizes = {
        "5GB": 5 * 10**9,
        "500MB": 500 * 10**6,
        "20KB": 20_000,
        "1.5gb": 1_500_000_000,
        " 2TB ": 2 * 10**12,
        "10 MB": 10**7,
    }
    for size, expected in sizes.items():
        assert cli.size_in_bytes(size, "--max_shard_size") == expected
