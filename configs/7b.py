"""LLaMA-2-7B's shape: d_model 4096, 32 layers, 32 heads, MLP 11008, vocab 32000, seq 4096.

    python -m jaxlm.train --config=configs/7b.py --workdir=runs/7b

Sized for a TPU v4-128 / v5p-128 or 8x8 H100s with fsdp over every device (the default
mesh); about 1M tokens per optimizer step. On TPU, attention "auto" is splash.

Compiled with the TPU compiler (python -m jaxlm.aot / benchmarks.tpu_aot; jax 0.10.2,
libtpu 0.0.42), train step per chip, arguments + temporaries + unaliased outputs:
  v5p-128 (64 chips, 4 rows each), splash: 12.3 of 95 GiB (XLA attention: 20.2 GiB)
  v5e-256 (256 chips, 1 row each), splash:  4.0 of 16 GiB
  v6e-256 (256 chips, 1 row each), splash:  3.8 of 32 GiB
"""

from jaxlm.config import default_config


def get_config():
    config = default_config()
    m = config.model
    m.vocab_size = 32000
    m.d_model = 4096
    m.n_layers = 32
    m.n_heads = 32
    m.n_kv_heads = 32
    m.d_ff = 11008
    m.dtype = "bfloat16"
    m.remat = "full"

    config.data.seq_len = 4096

    t = config.train
    t.steps = 250000
    t.global_batch_size = 256
    t.lr = 3e-4
    t.warmup_steps = 2000
    t.eval_every = 2000

    config.checkpoint.every = 1000
    return config
