"""A 1.1B-parameter LLaMA-style model (TinyLlama's shape: 22 layers, GQA with 4 kv heads).

python -m jaxlm.train --config=configs/1b.py --workdir=runs/1b
"""

from jaxlm.config import default_config


def get_config():
    config = default_config()
    m = config.model
    m.vocab_size = 32000
    m.d_model = 2048
    m.n_layers = 22
    m.n_heads = 32
    m.n_kv_heads = 4
    m.d_ff = 5632
    m.dtype = "bfloat16"
    m.remat = "save_dots_and_attention"

    config.data.seq_len = 2048

    t = config.train
    t.steps = 50000
    t.global_batch_size = 512
    t.lr = 4e-4
    t.warmup_steps = 2000
    t.eval_every = 1000

    config.checkpoint.every = 1000
    return config
