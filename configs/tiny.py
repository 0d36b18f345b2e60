"""A small LLaMA-style model that trains on a CPU in a few minutes (the default run).

    python -m jaxlm.train --config=configs/tiny.py

Data: the built-in corpus (this Python's standard library); a 4096-piece sentencepiece
tokenizer is trained on it the first time and cached in the run directory.
"""

from jaxlm.config import default_config


def get_config():
    config = default_config()
    m = config.model
    m.vocab_size = 4096
    m.d_model = 256
    m.n_layers = 4
    m.n_heads = 4
    m.n_kv_heads = 2
    m.d_ff = 768
    m.remat = "none"
    m.attention = "xla"

    config.data.seq_len = 256
    config.data.eval_batches = 4

    t = config.train
    t.steps = 300
    t.global_batch_size = 8
    t.lr = 3e-3
    t.warmup_steps = 30
    t.weight_decay = 0.1
    t.log_every = 10
    t.eval_every = 100

    config.checkpoint.every = 100
    return config
