"""The ring strategy's variants, from the TPU compiler: how the backward is had and what runs
the blocks.

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m benchmarks.ring_variants   # v5p-16, 32k rows / 4

For each variant (`backward:blocks`: backward "custom_vjp" (jaxlm.attention.ring) or
"autodiff" (benchmarks.ring_autodiff); blocks "xla" (model.attention="xla") or "pallas"
(jaxlm.attention.ring_kernels, what splash attention runs the ring with)) two programs of
configs/7b.py's train step with model.context_parallel="ring" are compiled:

- memory: the whole step (32 layers, scanned) at --tokens_per_chip, mesh.sequence=--shards,
  as benchmarks.long_context compiles it: per-chip arguments and temporaries;
- time: XLA's estimated seconds (`cost_analysis()['optimal_seconds']`) and FLOPs of a
  program with no loops, so that the cost model counts every op once: one layer unrolled,
  one loss chunk, --cost_tokens_per_chip, and the ring's query tile as large as a block.
  XLA's cost model counts a Pallas kernel as ~0 FLOPs, so for "pallas" it is a lower bound
  that says nothing of the kernel's own time.

Results go to benchmarks/results/ring-variants.md (and .jsonl), with host and versions.
"""

from __future__ import annotations

import contextlib
import json
import time

import jax
from absl import app, flags

from benchmarks import long_context, results_table, ring_autodiff
from jaxlm import platforms, program_cost
from jaxlm import topology as topology_lib
from jaxlm.attention import ring_xla

# --topology, --tokens_per_chip (the memory program's) and --results: benchmarks.long_context's.
_TOPOLOGY, _TOKENS, _RESULTS = long_context._TOPOLOGY, long_context._TOKENS, long_context._RESULTS
_SHARDS = flags.DEFINE_integer("ring_shards", 4, "mesh.sequence.")
_COST_TOKENS = flags.DEFINE_integer(
    "cost_tokens_per_chip", 2048, "Tokens per chip, loop-free time program."
)
_VARIANTS = flags.DEFINE_list(
    "variants", ["custom_vjp:xla", "autodiff:xla"], "backward:blocks pairs."
)


BACKWARDS = {"custom_vjp": contextlib.nullcontext, "autodiff": ring_autodiff.autodiff_backward}
BLOCKS = {"xla": "xla", "pallas": "splash"}  # model.attention: splash runs the Pallas blocks


def run_variant(topology: topology_lib.Topology, variant: str) -> dict:
    backward, blocks = variant.split(":")
    devices = topology_lib.topology_devices(topology)
    config = long_context.config_for(topology.chips, _SHARDS.value, "ring", _TOKENS.value)
    small = long_context.config_for(topology.chips, _SHARDS.value, "ring", _COST_TOKENS.value)
    small.model.n_layers, small.model.scan_unroll, small.train.loss_chunks = 1, 1, 1
    config.model.attention = small.model.attention = BLOCKS[blocks]
    with BACKWARDS[backward]():
        memory = program_cost.compile_program(config, devices, topology, "train_step")
        tile = ring_xla.QUERY_TILE
        ring_xla.QUERY_TILE = small.data.seq_len  # one tile per block: no loop in the ring
        try:
            cost = program_cost.compile_program(small, devices, topology, "train_step")
        finally:
            ring_xla.QUERY_TILE = tile
    return {
        "variant": variant,
        "topology": topology.name,
        "sequence": _SHARDS.value,
        "seq_len": config.data.seq_len,
        "cost_seq_len": small.data.seq_len,
        "argument_bytes": memory.argument_bytes,
        "temp_bytes": memory.temp_bytes,
        "total_bytes": memory.argument_bytes
        + memory.temp_bytes
        + memory.output_bytes
        - memory.alias_bytes,
        "memory_compile_s": memory.compile_seconds,
        "layer_optimal_seconds": cost.optimal_seconds,
        "layer_flops": cost.flops,
        "layer_temp_bytes": cost.temp_bytes,
        "cost_compile_s": cost.compile_seconds,
        "out_of_memory": memory.out_of_memory or cost.out_of_memory,
    }


COLUMNS = [
    "backward:blocks",
    "row length",
    "arguments GiB",
    "temporaries GiB",
    "total GiB",
    "1-layer row",
    "1-layer est. ms",
    "1-layer TFLOPs (XLA count)",
    "compile s",
]


def table_cells(r: dict) -> list:
    gib = results_table.gib
    return [
        r["variant"],
        f"{r['seq_len']:,}",
        gib(r["argument_bytes"]),
        gib(r["temp_bytes"]),
        gib(r["total_bytes"]),
        f"{r['cost_seq_len']:,}",
        f"{1e3 * r['layer_optimal_seconds']:.2f}",
        f"{r['layer_flops'] / 1e12:.3f}",
        f"{r['memory_compile_s'] + r['cost_compile_s']:.0f}",
    ]


def main(argv):
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    del argv
    topology = topology_lib.parse_topology(_TOPOLOGY.value)
    rows = []
    for variant in _VARIANTS.value:
        row = run_variant(topology, variant)
        rows.append(row)
        print(json.dumps(row), flush=True)
    cpu = results_table.cpu()
    header = (
        f"# The ring's variants ({time.strftime('%Y-%m-%d')})\n\n"
        f"`python -m benchmarks.ring_variants --topology={_TOPOLOGY.value} "
        f"--ring_shards={_SHARDS.value} --tokens_per_chip={_TOKENS.value} "
        f"--cost_tokens_per_chip={_COST_TOKENS.value} --variants={','.join(_VARIANTS.value)}`: "
        f"configs/7b.py's train step, model.context_parallel='ring', mesh.sequence="
        f"{_SHARDS.value} on {topology.name} ({topology.chips} chips). Memory: the whole step "
        f"(32 layers, remat full, loss_chunks 8), per chip. Time: XLA's optimal_seconds of a "
        f"loop-free program (1 layer unrolled, 1 loss chunk, one query tile per ring block; an "
        f"estimate, and one that counts a Pallas kernel as ~0 FLOPs). Compiled on {cpu[0]} "
        f"({cpu[1]}), jax {jax.__version__}, libtpu {results_table.package_version('libtpu')}; "
        f"no TPU ran."
    )
    table = results_table.record(
        f"{_RESULTS.value}/ring-variants",
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
