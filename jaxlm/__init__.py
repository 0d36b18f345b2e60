"""jaxlm: train LLaMA-family language models with JAX and Flax.

The names a user of the layers needs, loaded on first use (so `import jaxlm.data` does not
pull in the model and its kernels):

    import jaxlm
    model = jaxlm.Transformer(jaxlm.ModelConfig(...))        # plain linen modules
    out = jaxlm.attention.attend(q, k, v, segment_ids, jaxlm.attention.Settings(impl="xla"))
    factory, derived = jaxlm.build_state(jaxlm.default_config())   # sharded train state
    train_step = jaxlm.make_train_step(factory)
    run = jaxlm.run.load("runs/tiny")                          # a trained run's params

`python -m jaxlm.train --config=...` runs training from a config file.
"""

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute in it; None: the module itself)
_EXPORTS = {
    "ModelConfig": ("jaxlm.model", "ModelConfig"),
    "Transformer": ("jaxlm.model", "Transformer"),
    "attention": ("jaxlm.attention", None),
    "default_config": ("jaxlm.config", "default_config"),
    "ConfigError": ("jaxlm.errors", "ConfigError"),
    "build_state": ("jaxlm.step", "build"),
    "make_train_step": ("jaxlm.step", "make_train_step"),
    "make_eval_step": ("jaxlm.step", "make_eval_step"),
    "run": ("jaxlm.run", None),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxlm' has no attribute {name!r}")
    module_name, attribute = _EXPORTS[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
