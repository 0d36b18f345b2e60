"""A 125M-parameter LLaMA-style model (GPT-3 Small shape), for one accelerator host.

python -m jaxlm.train --config=configs/125m.py --workdir=runs/125m
"""

from jaxlm.config import default_config


def get_config():
    config = default_config()
    m = config.model
    m.vocab_size = 32000
    m.d_model = 768
    m.n_layers = 12
    m.n_heads = 12
    m.n_kv_heads = 12
    m.d_ff = 2048
    m.dtype = "bfloat16"
    m.remat = "save_dots_no_batch"

    config.data.seq_len = 2048

    t = config.train
    t.steps = 20000
    t.global_batch_size = 256
    t.lr = 6e-4
    t.warmup_steps = 1000
    t.eval_every = 1000

    config.checkpoint.every = 1000
    return config
