"""jaxlm: train LLaMA-family language models with JAX and Flax.

`jaxlm.model` holds plain linen modules usable on their own; `python -m jaxlm.train`
runs training from a config file.
"""

__version__ = "0.1.0"
