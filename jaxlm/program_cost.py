"""What one program costs once compiled for a slice's devices, per device per microbatch.

Memory (arguments, temporaries, outputs and what they alias) and the compiler's cost (FLOPs,
bytes accessed, XLA's optimal_seconds, and the bytes the collectives move, read from the
HLO) of the real train or eval step (jaxlm.step), lowered and compiled for the devices of
jaxlm.topology. XLA counts a loop body once: `layer_corrected` counts the whole layer stack
from two small unrolled programs (jaxlm.aot's docstring says how). Compiles are cached by
the lowered program's fingerprint, in a JSON file (`--cache`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import re
import time

import jax

from jaxlm import step as step_lib
from jaxlm.topology import Topology

RAW_COUNT = (
    "XLA's raw count, NOT corrected: each loop body (the layer scan, the loss_chunks "
    "loop) counted once"
)
STOPPED = "none: the compiler stopped, out of memory"


@dataclasses.dataclass
class ProgramCost:
    """One compiled program per device per microbatch: its memory, its cost (FLOPs, bytes,
    XLA's optimal_seconds, the bytes its collectives move) and how that cost was counted.
    Memory is always the program's as compiled; the cost is XLA's raw count (loop bodies
    once) until `layer_corrected` counts every layer, and `cost_note` says which. Plain
    numbers, so it caches as JSON."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops: float
    bytes_accessed: float
    optimal_seconds: float
    collective_bytes: float
    compile_seconds: float
    out_of_memory: str = ""  # the compiler's refusal when the program cannot fit HBM
    cost_note: str = RAW_COUNT

    def to_cache(self) -> dict:
        """The measured figures: a cache entry says nothing of later corrections."""
        entry = dataclasses.asdict(self)
        del entry["cost_note"]
        return entry

    @classmethod
    def from_cache(cls, entry: dict) -> ProgramCost:
        return cls(**entry, cost_note=STOPPED if entry.get("out_of_memory") else RAW_COUNT)


_COLLECTIVE = re.compile(
    r"=\s*(\(.*?\)|\S+)\s+(all-gather|reduce-scatter|all-reduce|"
    r"all-to-all|collective-permute)(-start)?\("
)
_ARRAY = re.compile(r"\b(pred|[a-z]+?)(\d*)\[([\d,]*)\]")


def _array_bytes(kind: str, bits: str, dims: str) -> int:
    size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    width = int(bits) if bits else 8  # pred: one byte
    return size * max(width // 8, 1) if kind != "token" else 0


def collective_bytes(hlo_text: str) -> float:
    """Bytes the collectives of compiled HLO produce per device: the sum of their result
    sizes, all-reduce twice (reduce, then broadcast); an async start's tuple counts its
    largest array (the result). A lower bound on ICI traffic, for the roofline only."""
    total = 0.0
    for shape, op, _ in _COLLECTIVE.findall(hlo_text):
        arrays = [_array_bytes(*a) for a in _ARRAY.findall(shape)]
        total += (2 if op == "all-reduce" else 1) * max(arrays, default=0)
    return total


def _program(factory, derived, config, program: str):
    """The jitted step and its abstract arguments, for lowering."""
    batch = step_lib.abstract_batch(factory, derived.micro_batch_size, config.data.seq_len)
    if program == "train_step":
        return step_lib.make_train_step(factory), (factory.abstract, batch)
    return step_lib.make_eval_step(factory), (factory.abstract["params"], batch)


def _compiler_version(topology: Topology) -> str:
    if topology.platform == "cpu":
        return "cpu"
    from importlib import metadata

    return f"libtpu {metadata.version('libtpu')}"


def _fingerprint(lowered, topology: Topology) -> str:
    """Cache key: the lowered program (shapes, shardings, the mesh) and the target it is
    compiled for (the text names no device kind)."""
    text = (
        f"{topology.topology_name}x{topology.num_slices} jax {jax.__version__} "
        f"{_compiler_version(topology)}\n{lowered.as_text()}"
    )
    return hashlib.sha256(text.encode()).hexdigest()


# For the small programs that estimate cost only: libtpu's windowed einsums turn fsdp
# all-gather/reduce-scatter + matmul pairs into loops over the shards, loops the cost model
# counts once (seen with benchmarks.aot_vs_maxtext: 15-16 matmuls of a 7B layer).
NO_WINDOWED_EINSUMS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


def compile_program(
    config,
    devices,
    topology: Topology,
    program: str,
    cache: dict | None = None,
    compiler_options: dict | None = None,
) -> ProgramCost:
    """Lower and compile one step for `devices`; `cache` maps fingerprints to results."""
    factory, derived = step_lib.build(config, devices)
    with factory.context():
        fn, args = _program(factory, derived, config, program)
        lowered = fn.lower(*args)
        key = _fingerprint(lowered, topology) + (
            json.dumps(compiler_options, sort_keys=True) if compiler_options else ""
        )
        if cache is not None and key in cache:
            return ProgramCost.from_cache(cache[key])
        start = time.perf_counter()
        try:
            compiled = lowered.compile(compiler_options=compiler_options)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            result = _out_of_memory(str(e), time.perf_counter() - start)
        else:
            result = _measure(compiled, time.perf_counter() - start)
    if cache is not None:
        cache[key] = result.to_cache()
    return result


def _out_of_memory(message: str, seconds: float) -> ProgramCost:
    """The TPU compiler refuses a program that cannot fit HBM; its message says how much
    the temporaries need ("... HLO temporaries (128.88G) exceeds available HBM (95.74G)")."""
    sizes = re.findall(r"(\d+(?:\.\d+)?)([KMGT])\b", message)
    need = float(sizes[0][0]) * 2 ** (10 * "KMGT".index(sizes[0][1]) + 10) if sizes else math.inf
    nan = float("nan")
    return ProgramCost(
        argument_bytes=0,
        output_bytes=0,
        alias_bytes=0,
        temp_bytes=int(need) if math.isfinite(need) else 2**62,
        flops=nan,
        bytes_accessed=nan,
        optimal_seconds=nan,
        collective_bytes=nan,
        compile_seconds=seconds,
        out_of_memory=message.strip().splitlines()[0][:300],
        cost_note=STOPPED,
    )


def _measure(compiled, seconds: float) -> ProgramCost:
    """Memory and cost of a compiled program, and its collectives' bytes."""
    mem, cost = compiled.memory_analysis(), compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    result = ProgramCost(
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        optimal_seconds=float(cost.get("optimal_seconds", float("nan"))),
        collective_bytes=collective_bytes(compiled.as_text()),
        compile_seconds=seconds,
    )
    return result


def _unrolled(config, n_layers: int):
    """The same config with `n_layers` layers fully unrolled and one loss chunk: no loops,
    so the compiler counts every op."""
    small = config.copy_and_resolve_references()
    small.model.n_layers, small.model.scan_unroll, small.train.loss_chunks = n_layers, n_layers, 1
    return small


def layer_corrected(
    compiled: ProgramCost,
    config,
    devices,
    topology: Topology,
    program: str,
    cache: dict | None = None,
) -> ProgramCost:
    """`compiled` (the whole `program`) with its cost counted over all layers, from two
    unrolled programs of 1 and 2 layers, extrapolated linearly in the layer count (see the
    module doc); its memory stays the whole program's."""
    options = NO_WINDOWED_EINSUMS if topology.platform == "tpu" else None
    c1, c2 = (
        compile_program(_unrolled(config, n), devices, topology, program, cache, options)
        for n in (1, 2)
    )
    extra = config.model.n_layers - 1

    def at_l(field):
        return getattr(c1, field) + extra * (getattr(c2, field) - getattr(c1, field))

    return dataclasses.replace(
        compiled,
        flops=at_l("flops"),
        bytes_accessed=at_l("bytes_accessed"),
        optimal_seconds=at_l("optimal_seconds"),
        collective_bytes=at_l("collective_bytes"),
        cost_note=f"compiler count extrapolated from 1- and 2-layer unrolled compiles to "
        f"{config.model.n_layers} layers (XLA counts a loop body once"
        + ("; windowed einsums off in those" if options else "")
        + ")",
    )


def load_cache(path: str) -> dict:
    p = pathlib.Path(path)
    return json.loads(p.read_text()) if path and p.exists() else {}


def save_cache(path: str, cache: dict) -> None:
    if path:
        p = pathlib.Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(cache))
