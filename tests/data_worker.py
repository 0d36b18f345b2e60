"""Run by tests/test_data.py in fresh processes: iterator state across processes, and
2-process (jax.distributed, gloo) assembly of global batches.

    python tests/data_worker.py state-save DATA SEQ_LEN BATCH J       -> prints the state
    python tests/data_worker.py state-load DATA SEQ_LEN BATCH STATE N -> saves the next N batches
    python tests/data_worker.py multihost DATA SEQ_LEN BATCH N OUT    -> process 0 saves N batches
"""

import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from jaxlm.data import pipeline, prepared  # noqa: E402

SEED = 7


def batches(data_dir, seq_len, batch_size):
    rows = pipeline.PackedRows(prepared.PreparedDataset(data_dir).documents("train"), seq_len, SEED)
    return pipeline.Batches(
        pipeline.train_dataset(rows, batch_size, SEED), num_threads=2, prefetch=2
    )


def save(path, batch_list):
    np.savez(path, **{f"{k}_{i}": b[k] for i, b in enumerate(batch_list) for k in b})


def main(mode, data_dir, seq_len, batch_size, *rest):
    seq_len, batch_size = int(seq_len), int(batch_size)
    if mode == "state-save":
        it = batches(data_dir, seq_len, batch_size)
        for _ in range(int(rest[0])):
            next(it)
        print(json.dumps(it.get_state()))
    elif mode == "state-load":
        state, n, out = json.loads(rest[0]), int(rest[1]), rest[2]
        it = batches(data_dir, seq_len, batch_size)
        it.set_state(state)
        save(out, [next(it) for _ in range(n)])
    elif mode == "multihost":
        import jax
        from jax.experimental import multihost_utils

        from jaxlm import sharding as sharding_lib

        sharding_lib.maybe_initialize_distributed()
        assert jax.process_count() == 2, jax.process_count()
        n, out = int(rest[0]), rest[1]
        mesh = sharding_lib.make_mesh(
            {"data": 1, "fsdp": jax.device_count(), "tensor": 1, "sequence": 1}
        )
        sharding = sharding_lib.batch_sharding(mesh, sharding_lib.axis_rules())
        it = batches(data_dir, seq_len, batch_size)
        gathered = []
        for _ in range(n):
            local = next(it)
            assert len(local["inputs"]) == batch_size // 2  # this process's half only
            global_arrays = sharding_lib.global_batch(local, sharding)
            gathered.append(
                {
                    k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
                    for k, v in global_arrays.items()
                }
            )
        if jax.process_index() == 0:
            save(out, gathered)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(*sys.argv[1:])
