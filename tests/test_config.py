"""Bad configs fail in jaxlm.config.validate, naming the field, before anything compiles."""

import jax
import pytest

from configs import tiny
from jaxlm import config as config_lib
from jaxlm import train as train_lib


def _config(**changes):
    config = tiny.get_config()
    for dotted, value in changes.items():
        section, field = dotted.split("__")
        config[section][field] = value
    return config


BAD = [
    # (changes, devices, words the message must contain)
    (
        dict(model__n_heads=6, model__n_kv_heads=6, model__head_dim=64, mesh__tensor=4),
        8,
        ["config.model.n_heads=6", "mesh.tensor=4"],
    ),
    (
        dict(train__global_batch_size=12),
        8,
        ["config.train.global_batch_size=12", "mesh.data*mesh.fsdp = 8"],
    ),
    (
        dict(train__global_batch_size=16, train__grad_accum_steps=4),
        8,
        ["config.train.global_batch_size=16", "data-parallel degree"],
    ),
    (dict(model__n_kv_heads=3), 8, ["config.model.n_kv_heads=3", "must divide model.n_heads=4"]),
    (dict(mesh__data=4, mesh__fsdp=4), 8, ["config.mesh=", "needs 16 devices", "only 8"]),
    (dict(mesh__data=-1, mesh__fsdp=-1), 8, ["at most one mesh axis may be -1"]),
    (dict(mesh__data=3), 8, ["config.mesh.fsdp=-1", "3", "does not divide the 8 devices"]),
    (dict(model__remat="sometimes"), 8, ["config.model.remat='sometimes'", "save_dots"]),
    (dict(model__scan_unroll=0), 8, ["config.model.scan_unroll=0", "between 1 and"]),
    (dict(train__loss_chunks=3), 8, ["config.train.loss_chunks=3", "divisor of data.seq_len"]),
    (
        dict(train__loss_chunks=128, mesh__sequence=4, mesh__fsdp=2),
        8,
        ["config.train.loss_chunks=128", "mesh.sequence=4"],
    ),
    (dict(model__dtype="float8"), 8, ["config.model.dtype='float8'", "bfloat16"]),
    (dict(model__d_model=250, model__head_dim=0), 8, ["config.model.n_heads=4", "d_model=250"]),
]


@pytest.mark.parametrize("changes,devices,words", BAD)
def test_bad_config_names_the_field(changes, devices, words):
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(_config(**changes), devices)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_unknown_field_is_named():
    config = tiny.get_config()
    config.model.n_layer = 2  # typo for n_layers
    config.trian = {"steps": 3}
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.n_layer\b.*config\.trian"):
        config_lib.validate(config, 8)


def test_train_rejects_bad_config_before_compiling(tmp_path):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if "compile" in event else None
    )
    jax.jit(lambda x: x + 1)(1.0)  # the listener does see compilations
    assert compiles
    compiles.clear()
    with pytest.raises(config_lib.ConfigError, match="model.n_heads=6"):
        train_lib.train(
            _config(model__n_heads=6, model__n_kv_heads=6, model__head_dim=64, mesh__tensor=4),
            tmp_path,
        )
    assert compiles == []


def test_bfloat16_scores_need_xla_attention():
    with pytest.raises(config_lib.ConfigError, match="model.float32_attention_scores=False"):
        config_lib.validate(
            _config(model__float32_attention_scores=False, model__attention="splash"), 8
        )
    config_lib.validate(_config(model__float32_attention_scores=False, model__attention="xla"), 8)


def test_good_config_derives_values():
    config = _config(train__global_batch_size=32, train__grad_accum_steps=2, mesh__tensor=2)
    derived = config_lib.validate(config, 8)
    assert derived.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}
    assert derived.micro_batch_size == 16 and derived.per_device_batch_size == 4
    assert derived.head_dim == 64
    m = config.model
    by_hand = (
        m.vocab_size * m.d_model * 2
        + m.d_model
        + m.n_layers * (m.d_model * 64 * (2 * 4 + 2 * 2) + 3 * m.d_model * m.d_ff + 2 * m.d_model)
    )
    assert derived.n_params == by_hand


@pytest.mark.parametrize(
    "override, words",
    [
        (
            "--config.train.stepz=3",
            ["--config.train.stepz", 'train has no field "stepz"', 'did you mean "steps"'],
        ),
        ("--config.trian.steps=3", ['config has no field "trian"', 'did you mean "train"']),
    ],
)
def test_unknown_command_line_override_is_one_line_not_a_traceback(override, words, repo):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "jaxlm.train", "--config=configs/tiny.py", override],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=repo,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in result.stderr, result.stderr[-2000:]


CONFIG_FILES = {
    "missing": (
        "configs/nope.py",
        None,
        ["--config=configs/nope.py", "no such file", "--config=configs/tiny.py"],
    ),
    "syntax_error": ("bad.py", "def get_config(:\n", ["syntax error at line 1", "fix the file"]),
    "no_get_config": ("empty.py", "x = 1\n", ["defines no get_config()", "configs/tiny.py"]),
    "a_directory": ("configs", None, ["--config=configs", "is not a file"]),
}


@pytest.mark.parametrize("case", CONFIG_FILES)
def test_config_file_that_cannot_load_is_one_line_not_a_traceback(case, repo, tmp_path):
    import subprocess
    import sys

    name, text, words = CONFIG_FILES[case]
    path = name
    if text is not None:
        path = str(tmp_path / name)
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "jaxlm.train", f"--config={path}", f"--workdir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=repo,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"config error: --config={path}")
    for word in words:
        assert word in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # stopped before anything was written
