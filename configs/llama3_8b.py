"""Llama-3-8B's shape: d_model 4096, 32 layers, 32 heads with 8 kv heads, MLP 14336,
vocab 128256, rope theta 500000, seq 8192.

    python -m jaxlm.train --config=configs/llama3_8b.py --workdir=runs/llama3_8b
    python -m jaxlm.aot --config=configs/llama3_8b.py --topology=v5p-128   # will it fit?

About 1M tokens per optimizer step (128 rows of 8192). The 128k vocabulary makes the
float32 logits of one row 4 GiB, so the LM head and loss run in 4 slices
(train.loss_chunks). On TPU, attention "auto" is splash.

Compiled with the TPU compiler (benchmarks.tpu_aot; jax 0.10.2, libtpu 0.0.42), train step
per chip, arguments + temporaries + unaliased outputs:
  v5p-128 (64 chips, 2 rows each), splash: 14.7 of 95 GiB
"""

from jaxlm.config import default_config


def get_config():
    config = default_config()
    m = config.model
    m.vocab_size = 128256
    m.d_model = 4096
    m.n_layers = 32
    m.n_heads = 32
    m.n_kv_heads = 8
    m.d_ff = 14336
    m.rope_theta = 500000.0
    m.dtype = "bfloat16"
    m.remat = "full"

    config.data.seq_len = 8192

    t = config.train
    t.steps = 250000
    t.global_batch_size = 128
    t.loss_chunks = 4
    t.lr = 3e-4
    t.warmup_steps = 2000
    t.eval_every = 2000

    config.checkpoint.every = 1000
    return config
