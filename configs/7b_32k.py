"""The 7B shape (configs/7b.py) on rows of 32,768 tokens, each row split over 4 devices.

    python -m jaxlm.train --config=configs/7b_32k.py --workdir=runs/7b_32k

Context parallelism (jaxlm.attention): mesh.sequence=4 puts a quarter of every row on
each device, in the load-balanced order; attention gathers keys and values per layer
("all_gather", splash per shard on TPU). Weights are sharded over fsdp and sequence together.
32 rows x 32,768 tokens = 1M tokens per optimizer step, as configs/7b.py; RoPE theta raised to
500,000 for the longer context (as LLaMA-3 does), so start from a model trained at 4096 with
checkpoint.init_from, or train from scratch.

Sized for a TPU v5p-64 (32 chips: fsdp 8 x sequence 4, 4 row quarters per chip). Compiled
for it with the TPU compiler (jaxlm.aot on a CPU host; jax 0.10.2, libtpu 0.0.42), train step
per chip: 2.36 GiB arguments + 24.42 GiB temporaries = 26.8 of 95 GiB (splash per shard).
"""

import importlib


def get_config():
    config = importlib.import_module("configs.7b").get_config()
    config.model.rope_theta = 500000.0
    config.model.context_parallel = "all_gather"
    config.data.seq_len = 32768
    config.train.global_batch_size = 32
    config.mesh.sequence = 4
    return config
