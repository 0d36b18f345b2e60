"""Long context: memory per chip as the sequence axis grows, from the TPU compiler.

    python -m benchmarks.long_context                          # v5p-16, 8192 tokens per chip
    python -m benchmarks.long_context --topology=cpu:8         # without libtpu

The 7B shape (configs/7b.py) on one slice, each chip holding the same number of tokens
(--tokens_per_chip): with mesh.sequence = n the row is n times longer (n x tokens_per_chip)
and split over n chips, with chips / n rows per step (fsdp = chips / n). Weights are sharded
over fsdp x sequence, so they cost every row the same. For each n and each context-parallel
strategy the real train step is compiled (jaxlm.aot, memory only, no loop correction) and
its per-chip arguments and temporaries recorded: what it shows is how the per-chip memory
holds as the context grows n-fold, and which strategy pays for the longer row.

Results go to benchmarks/results/long-context.md (and .jsonl), with host and versions.
"""

from __future__ import annotations

import importlib
import json
import time

import jax
from absl import app, flags

from benchmarks import results_table
from jaxlm import aot, platforms
from jaxlm import topology as topology_lib

_gib = results_table.gib

_TOPOLOGY = flags.DEFINE_string("topology", "v5p-16", "The slice (see jaxlm.topology).")
_TOKENS = flags.DEFINE_integer("tokens_per_chip", 8192, "Tokens each chip holds per step.")
_SHARDS = flags.DEFINE_list("shards", ["1", "2", "4", "8"], "mesh.sequence values.")
_STRATEGIES = flags.DEFINE_list(
    "strategies", ["all_gather", "ring"], "model.context_parallel values (for sequence > 1)."
)
_RESULTS = flags.DEFINE_string("results", "benchmarks/results", "Where the table goes.")


def config_for(chips: int, shards: int, strategy: str, tokens_per_chip: int):
    config = importlib.import_module("configs.7b").get_config()
    config.data.seq_len = tokens_per_chip * shards
    config.train.global_batch_size = chips // shards
    config.train.loss_chunks = 8  # the logits of 8192 tokens x 32000 in float32 would be 1 GiB
    config.mesh.update({"data": 1, "fsdp": chips // shards, "tensor": 1, "sequence": shards})
    config.model.context_parallel = strategy
    return config


def run_row(
    topology: topology_lib.Topology, shards: int, strategy: str, tokens_per_chip: int
) -> dict:
    config = config_for(topology.chips, shards, strategy, tokens_per_chip)
    start = time.perf_counter()
    report = aot.compile_for(config, topology, programs=("train_step",), loop_correction=False)[0]
    attention = aot.attention_impl(config, topology_lib.topology_devices(topology))
    if shards > 1 and strategy == "ring" and attention == "splash":
        attention = "ring_kernels"  # the ring's own Pallas blocks
    return {
        "sequence": shards,
        "strategy": strategy if shards > 1 else "-",
        "attention": attention,
        "seq_len": config.data.seq_len,
        "rows": config.train.global_batch_size,
        "tokens_per_chip": tokens_per_chip,
        "wall_s": time.perf_counter() - start,
        **json.loads(report.line()),
    }


COLUMNS = [
    "mesh.sequence",
    "strategy",
    "block kernel",
    "row length",
    "rows per step",
    "arguments GiB",
    "temporaries GiB",
    "total GiB",
    "HBM GiB",
    "fits",
    "compile s",
]


def table_cells(r: dict) -> list:
    return [
        r["sequence"],
        r["strategy"],
        r["attention"],
        f"{r['seq_len']:,}",
        r["rows"],
        _gib(r["argument_bytes"]),
        _gib(r["temp_bytes"]),
        _gib(r["total_bytes"]),
        _gib(r["hbm_bytes"]),
        "yes" if r["fits"] else "NO",
        f"{r['wall_s']:.0f}",
    ]


def main(argv):
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    del argv
    topology = topology_lib.parse_topology(_TOPOLOGY.value)
    rows = []
    for shards in map(int, _SHARDS.value):
        for strategy in _STRATEGIES.value if shards > 1 else _STRATEGIES.value[:1]:
            row = run_row(topology, shards, strategy, _TOKENS.value)
            rows.append(row)
            print(
                f"sequence={shards} {row['strategy']}: row {row['seq_len']}, total "
                f"{_gib(row['total_bytes'])} GiB (temporaries {_gib(row['temp_bytes'])}), "
                f"{row['wall_s']:.0f} s to compile",
                flush=True,
            )
    cpu = results_table.cpu()
    header = (
        f"# Long context: memory per chip as the sequence axis grows "
        f"({time.strftime('%Y-%m-%d')})\n\n"
        f"`python -m benchmarks.long_context --topology={_TOPOLOGY.value} "
        f"--tokens_per_chip={_TOKENS.value}`: configs/7b.py's shape (32 layers, remat full, "
        f"bf16 compute, loss_chunks 8) on {topology.name} ({topology.chips} chips), each chip "
        f"holding {_TOKENS.value:,} tokens per step whatever mesh.sequence is: the row grows "
        "with the sequence axis, the rows per step shrink. Train step per chip as the "
        f"compiler reports it (arguments + temporaries + unaliased outputs); compiled on "
        f"{cpu[0]} ({cpu[1]}), jax {jax.__version__}, libtpu "
        f"{results_table.package_version('libtpu')}; no TPU ran."
    )
    table = results_table.record(
        f"{_RESULTS.value}/long-context",
        rows,
        header,
        COLUMNS,
        [table_cells(r) for r in rows],
        mode="replace",
        spaced_rule=True,
    )
    print(table.read_text())


if __name__ == "__main__":
    app.run(main)
