"""LLaMA-2-70B's shape: d_model 8192, 80 layers, 64 heads with 8 kv heads, MLP 28672,
vocab 32000, seq 4096.

    python -m jaxlm.train --config=configs/70b.py --workdir=runs/70b
    python -m jaxlm.aot --config=configs/70b.py --topology=v5p-256   # will it fit?

About 2M tokens per optimizer step (512 rows of 4096): 4 rows per chip on a v5p-256
(128 chips), fsdp over every chip (the default mesh). On TPU, attention "auto" is splash.

Compiled with the TPU compiler (benchmarks.tpu_aot; jax 0.10.2, libtpu 0.0.42), train step
per chip, arguments + temporaries + unaliased outputs:
  v5p-256 (128 chips, 4 rows each), splash: 48.8 of 95 GiB
"""

from jaxlm.config import default_config


def get_config():
    config = default_config()
    m = config.model
    m.vocab_size = 32000
    m.d_model = 8192
    m.n_layers = 80
    m.n_heads = 64
    m.n_kv_heads = 8
    m.d_ff = 28672
    m.dtype = "bfloat16"
    m.remat = "full"

    config.data.seq_len = 4096

    t = config.train
    t.steps = 250000
    t.global_batch_size = 512
    t.lr = 1.5e-4
    t.warmup_steps = 2000
    t.eval_every = 2000

    config.checkpoint.every = 500
    return config
