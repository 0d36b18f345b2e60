"""`import jaxlm` gives the names README's "Use the model in your own code" promises, lazily."""

import subprocess
import sys

import jaxlm


def test_every_public_name_resolves_to_its_module_object():
    from jaxlm import attention, config, errors, model, run, step

    expected = {
        "ModelConfig": model.ModelConfig,
        "Transformer": model.Transformer,
        "attention": attention,
        "default_config": config.default_config,
        "ConfigError": errors.ConfigError,
        "build_state": step.build,
        "make_train_step": step.make_train_step,
        "make_eval_step": step.make_eval_step,
        "run": run,
    }
    assert sorted(expected) == jaxlm.__all__
    for name, value in expected.items():
        assert getattr(jaxlm, name) is value, name
    assert callable(jaxlm.run.load) and callable(jaxlm.attention.attend)


def test_importing_jaxlm_loads_nothing_heavy():
    """The names load on first use: `import jaxlm` alone imports neither JAX nor the model."""
    code = (
        "import sys, jaxlm; print(sorted(m for m in sys.modules if m.startswith(('jax', 'flax'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['jaxlm']"


def test_unknown_name_is_an_attribute_error():
    try:
        jaxlm.Transformr  # noqa: B018
    except AttributeError as e:
        assert "Transformr" in str(e)
    else:
        raise AssertionError("jaxlm.Transformr resolved")


def test_run_load_reads_a_trained_run(small_run):
    """The public path from a run directory to params and its model config."""
    loaded = jaxlm.run.load(small_run)
    assert loaded.config.n_layers == 2 and loaded.config.d_model == 64
    assert "embedding" in loaded.params
