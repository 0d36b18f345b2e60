"""`python -m jaxlm.aot --config=configs/7b.py --topology=v5p-128`: will it fit, and how fast?

Compiles the real train and eval steps for a named TPU slice on any host (libtpu's compiler
runs on the CPU; no TPU needed), or for `cpu:N` simulated devices, and reports per device:
memory (arguments, temporaries, outputs not aliased, against the chip's HBM), FLOPs per
step (DESIGN.md's formula, and the compiler's own count with its loops corrected), and an
estimated step time with the tokens/s and MFU it implies. `--plan` searches remat policy,
gradient accumulation, loss chunks and the mesh split for the fastest setup that fits.

As a library: `compile_for(config, "v5p-128")` returns one `Report` per program; `plan()`
returns the ranked candidates. Exit codes: 0 fits, 3 does not fit, 2 a usage or config error.

Why the loop correction: XLA's cost analysis counts a while-loop body once, so the layer
scan (and the loss_chunks loop) would be counted for one layer. Two small programs of the
same config, with 1 and 2 layers fully unrolled and one loss chunk, give the cost of the
rest of the step (c1) and of one layer (c2 - c1); cost(L) = c1 + (L - 1) * (c2 - c1).

The step time is an estimate, never a measurement: XLA's own optimal_seconds (extrapolated
the same way) where it is plausible, else a roofline of ours (FLOPs at peak or bytes at HBM
bandwidth, plus collective bytes over ICI); the report says which. Splash attention is a
Pallas kernel the cost model counts as ~0 FLOPs: its FLOPs are added by formula. One
microbatch is compiled; a step is train.grad_accum_steps of them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import pathlib
import re
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from jaxlm import config as config_lib
from jaxlm import metrics
from jaxlm import step as step_lib

INSTALL_TPU = "pip install -e '.[tpu]'"
USAGE_EXIT, NO_FIT_EXIT = 2, 3
PROGRAMS = ("train_step", "eval_step")
TOPOLOGY_FORMS = ("v4-N, v5p-N (N counts TensorCores, 2 per chip: v5p-128 is 64 chips)",
                  "v5e-N, v6e-N (N counts chips: v5e-256 is 16x16)",
                  "an explicit libtpu topology such as v5p:4x4x4 or v5e:2x4",
                  "cpu:N (N simulated CPU devices)")
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}  # in the slice names' count
_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}  # torus dimensions
# cpu:N has no spec sheet: its devices share the host's RAM, and these nominal rates (a
# 2-core VM's measured matmul rate, NOTES.md; DDR and memcpy orders of magnitude) only
# make the estimate's arithmetic run. Labelled "nominal" wherever printed.
_CPU_NOMINAL = {"peak_flops": 100e9, "hbm_bytes_per_s": 20e9, "ici_bytes_per_s": 10e9}


class TopologyError(ValueError):
    """A topology name that names no slice, or no compiler to compile for it."""


# ---------------------------------------------------------------------------- topologies


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice (times num_slices) as libtpu names it, with its chip figures per device."""

    name: str  # as the user gave it
    platform: str  # "tpu" or "cpu"
    generation: str  # "v4", "v5e", "v5p", "v6e" or "cpu"
    topology_name: str  # what get_topology_desc takes, e.g. "v5p:4x4x2"; "cpu:8"
    chips: int  # all slices together (cpu: devices)
    num_slices: int = 1


def _chip_dims(chips: int, ndim: int) -> tuple[int, ...]:
    """A power-of-two chip count as a near-cubic (near-square) torus, largest axes first:
    32 -> 4x4x2, 64 -> 4x4x4, 8 (2-D) -> 2x4 as Google names v5e-8."""
    k = chips.bit_length() - 1
    exps = [k // ndim + (1 if i < k % ndim else 0) for i in range(ndim)]
    if ndim == 2:
        exps = sorted(exps)  # v5e / v6e slices name the short side first: 2x4, 8x16
    return tuple(2 ** e for e in exps)


def _unknown(name: str, why: str) -> TopologyError:
    return TopologyError(f"--topology={name!r}: {why}; known forms: " + "; ".join(TOPOLOGY_FORMS))


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """`v5p-64` -> v5p:4x4x2 (32 chips); `v5e:2x4` as given; `cpu:8`; else a TopologyError
    listing the forms it knows."""
    if num_slices < 1:
        raise TopologyError(f"--num_slices={num_slices} is invalid: at least 1")
    if m := re.fullmatch(r"cpu:(\d+)", name):
        if num_slices != 1:
            raise TopologyError("--num_slices applies to TPU slices only, not cpu:N")
        return Topology(name, "cpu", "cpu", name, int(m.group(1)))
    if m := re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", name):
        gen, dims = m.group(1), [int(x) for x in m.group(2).split("x")]
        if len(dims) != _DIMS[gen]:
            raise _unknown(name, f"{gen} slices have {_DIMS[gen]} dimensions")
        return Topology(name, "tpu", gen, name, math.prod(dims) * num_slices, num_slices)
    if m := re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod)-(\d+)", name):
        gen = {"v5litepod": "v5e"}.get(m.group(1), m.group(1))
        count = int(m.group(2))
        chips = count // _CORES_PER_CHIP[gen]
        if count % _CORES_PER_CHIP[gen] or chips < 1 or chips & (chips - 1):
            raise _unknown(name, f"{gen}-N needs N a power of two "
                                 f"(and at least {_CORES_PER_CHIP[gen]})")
        dims = "x".join(map(str, _chip_dims(chips, _DIMS[gen])))
        return Topology(name, "tpu", gen, f"{gen}:{dims}", chips * num_slices, num_slices)
    raise _unknown(name, "not a slice name")


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """What one device of the slice has: memory, peak and bandwidths; where they came from."""

    hbm_bytes: float
    peak_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float
    source: str


def device_spec(topology: Topology, n_devices: int, hbm_bytes: float | None = None) -> DeviceSpec:
    """The chip's figures per JAX device: compile-only v4 topologies have one device per
    TensorCore (two per chip), so a device gets half a chip."""
    if topology.platform == "cpu":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        share = 1 / n_devices  # simulated devices share the host
        spec = DeviceSpec(ram * share, _CPU_NOMINAL["peak_flops"] * share,
                          _CPU_NOMINAL["hbm_bytes_per_s"] * share,
                          _CPU_NOMINAL["ici_bytes_per_s"] * share,
                          f"host RAM / {n_devices} devices; nominal CPU rates, not a spec")
    else:
        chip = metrics.TPU_CHIP_SPECS[topology.generation]
        peak = dict(metrics.PEAK_FLOPS)[f"TPU {topology.generation}" if topology.generation
                                        != "v6e" else "TPU v6"]
        share = topology.chips / n_devices
        spec = DeviceSpec(chip["hbm_bytes"] * share, peak * share,
                          chip["hbm_bytes_per_s"] * share, chip["ici_bytes_per_s"] * share,
                          f"TPU {topology.generation} published spec"
                          + (f", per TensorCore ({n_devices // topology.chips} devices a chip)"
                             if share != 1 else ""))
    if hbm_bytes is not None:
        spec = dataclasses.replace(spec, hbm_bytes=hbm_bytes,
                                   source=spec.source + "; memory overridden (--hbm_gib)")
    return spec


def topology_devices(topology: Topology) -> list:
    """The slice's devices: compile-only TPU devices from libtpu, or this process's CPUs."""
    if topology.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < topology.chips:
            raise TopologyError(
                f"--topology={topology.name} needs {topology.chips} CPU devices but this process "
                f"has {len(devices)}; set XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{topology.chips} JAX_PLATFORMS=cpu before JAX starts (the CLI does this itself)")
        return devices[:topology.chips]
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError("libtpu is not installed: it holds the TPU compiler that "
                            f"--topology={topology.name} needs; install it with {INSTALL_TPU}")
    from jax.experimental import topologies

    # Compiling touches no TPU, so libtpu's one-process-per-host lock (a file in /tmp) only
    # makes a second compile (a test run, another planner) fail to start.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    describe = functools.partial(topologies.get_topology_desc, topology.topology_name,
                                 platform="tpu", num_slices=topology.num_slices)
    try:
        try:
            return list(describe().devices)
        except Exception as e:
            if "chips_per_host_bounds" not in str(e):
                raise
            # A slice smaller than one host (v5e-1, v5p-2): the slice is the whole host.
            dims = [int(x) for x in topology.topology_name.split(":")[1].split("x")]
            return list(describe(chips_per_host_bounds=(dims + [1])[:3]).devices)
    except Exception as e:  # libtpu's own words on a shape it does not know
        raise _unknown(topology.name, f"libtpu rejects {topology.topology_name}: {e}") from e


# ------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class Compiled:
    """What one compiled program tells: memory per device, its cost (loops counted once)
    and the bytes its collectives move. Plain numbers, so it caches as JSON."""

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


_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-gather|reduce-scatter|all-reduce|"
                         r"all-to-all|collective-permute)(-start)?\(")
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
    text = (f"{topology.topology_name}x{topology.num_slices} jax {jax.__version__} "
            f"{_compiler_version(topology)}\n{lowered.as_text()}")
    return hashlib.sha256(text.encode()).hexdigest()


# For the small programs that estimate cost only: libtpu's windowed einsums turn fsdp
# all-gather/reduce-scatter + matmul pairs into loops over the shards, loops the cost model
# counts once (seen with benchmarks.aot_vs_maxtext: 15-16 matmuls of a 7B layer).
NO_WINDOWED_EINSUMS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                       "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def compile_program(config, devices, topology: Topology, program: str,
                    cache: dict | None = None, compiler_options: dict | None = None) -> Compiled:
    """Lower and compile one step for `devices`; `cache` maps fingerprints to results."""
    factory, derived = step_lib.build(config, devices)
    with factory.context():
        fn, args = _program(factory, derived, config, program)
        lowered = fn.lower(*args)
        key = _fingerprint(lowered, topology) + (
            json.dumps(compiler_options, sort_keys=True) if compiler_options else "")
        if cache is not None and key in cache:
            return Compiled(**cache[key])
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
        cache[key] = dataclasses.asdict(result)
    return result


def _out_of_memory(message: str, seconds: float) -> Compiled:
    """The TPU compiler refuses a program that cannot fit HBM; its message says how much
    the temporaries need ("... HLO temporaries (128.88G) exceeds available HBM (95.74G)")."""
    sizes = re.findall(r"(\d+(?:\.\d+)?)([KMGT])\b", message)
    need = float(sizes[0][0]) * 2 ** (10 * "KMGT".index(sizes[0][1]) + 10) if sizes else math.inf
    nan = float("nan")
    return Compiled(argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=int(need)
                    if math.isfinite(need) else 2**62, flops=nan, bytes_accessed=nan,
                    optimal_seconds=nan, collective_bytes=nan, compile_seconds=seconds,
                    out_of_memory=message.strip().splitlines()[0][:300])


def _measure(compiled, seconds: float) -> Compiled:
    """Memory and cost of a compiled program, and its collectives' bytes."""
    mem, cost = compiled.memory_analysis(), compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    result = Compiled(
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        optimal_seconds=float(cost.get("optimal_seconds", float("nan"))),
        collective_bytes=collective_bytes(compiled.as_text()), compile_seconds=seconds)
    return result


def _unrolled(config, n_layers: int):
    """The same config with `n_layers` layers fully unrolled and one loss chunk: no loops,
    so the compiler counts every op."""
    small = config.copy_and_resolve_references()
    small.model.n_layers, small.model.scan_unroll, small.train.loss_chunks = n_layers, n_layers, 1
    return small


@dataclasses.dataclass(frozen=True)
class Cost:
    """A microbatch's cost per device, all layers counted."""

    flops: float
    bytes_accessed: float
    optimal_seconds: float
    collective_bytes: float
    note: str


def layer_corrected_cost(config, devices, topology, program, cache=None) -> Cost:
    """Cost of the whole `program` per device per microbatch, from two unrolled programs
    of 1 and 2 layers, extrapolated linearly in the layer count (see the module doc)."""
    options = NO_WINDOWED_EINSUMS if topology.platform == "tpu" else None
    c1, c2 = (compile_program(_unrolled(config, n), devices, topology, program, cache, options)
              for n in (1, 2))
    extra = config.model.n_layers - 1

    def at_l(field):
        return getattr(c1, field) + extra * (getattr(c2, field) - getattr(c1, field))

    return Cost(at_l("flops"), at_l("bytes_accessed"), at_l("optimal_seconds"),
                at_l("collective_bytes"),
                f"compiler count extrapolated from 1- and 2-layer unrolled compiles to "
                f"{config.model.n_layers} layers (XLA counts a loop body once"
                + ("; windowed einsums off in those" if options else "") + ")")


# -------------------------------------------------------------------------- estimates


def attention_impl(config, devices) -> str:
    """The attention the step compiles to: "auto" decided by the devices (splash on a TPU
    slice, even from a CPU host), as jaxlm.step.build decides it."""
    shape = config_lib.resolve_mesh_shape(config.mesh, len(devices))
    return config_lib.attention_impl(config, shape, devices[0].platform)


def _saves_attention(remat: str) -> bool:
    """Whether the backward pass reuses the attention kernel's forward instead of running it
    again: no remat, or a policy that names attention as saved."""
    return remat == "none" or "attention" in remat


def splash_attention_flops(config, derived, batch_rows: int, train: bool) -> float:
    """Attention FLOPs of a Pallas (splash) kernel, which XLA's cost model counts as ~0:
    causal forward 2 matmuls of 2*b*h*L*L*d/2 each; backward ~2.5x the forward; one more
    forward when the remat policy recomputes it."""
    m, seq = config.model, config.data.seq_len
    forward = 2 * (2 * batch_rows * m.n_heads * seq * seq * derived.head_dim / 2) * m.n_layers
    if not train:
        return forward
    return forward * (1 + 2.5 + (0 if _saves_attention(m.remat) else 1))


def roofline_seconds(flops, bytes_accessed, coll_bytes, spec: DeviceSpec) -> float:
    """Compute or HBM bound, whichever is slower, plus collectives not overlapped."""
    return (max(flops / spec.peak_flops, bytes_accessed / spec.hbm_bytes_per_s)
            + coll_bytes / spec.ici_bytes_per_s)


def estimate_seconds(cost: Cost, spec: DeviceSpec, extra_flops: float = 0.0) -> tuple[float, str]:
    """Seconds per microbatch per device and which estimate it is. XLA's own optimal_seconds
    where it is plausible (positive, and no faster than the peak allows for the FLOPs);
    otherwise our roofline. `extra_flops` (kernels the cost model misses) run at peak."""
    roof = roofline_seconds(cost.flops + extra_flops, cost.bytes_accessed,
                            cost.collective_bytes, spec)
    xla = cost.optimal_seconds + extra_flops / spec.peak_flops
    floor = (cost.flops + extra_flops) / spec.peak_flops
    if math.isfinite(xla) and cost.optimal_seconds > 0 and floor * 0.9 <= xla <= 100 * roof:
        return xla, "XLA optimal_seconds, extrapolated over layers"
    why = ("missing" if not math.isfinite(cost.optimal_seconds) else
           f"implausible ({cost.optimal_seconds:.3g} s)")
    return roof, (f"roofline: max(FLOPs/peak, bytes/HBM bandwidth) + collective bytes/ICI "
                  f"bandwidth (XLA optimal_seconds {why})")


# ---------------------------------------------------------------------------- reports


@dataclasses.dataclass
class Report:
    """One compiled program on one topology, per device (a chip; a TensorCore on v4)."""

    program: str
    topology: str
    topology_name: str
    num_slices: int
    chips: int
    devices: int
    fits: bool
    argument_bytes: int
    temp_bytes: int
    output_bytes: int  # outputs not aliased to (donated) arguments
    total_bytes: int
    hbm_bytes: int
    headroom_bytes: int
    flops: float  # per device per step, compiler count, loops corrected (+ splash formula)
    flops_formula: float  # per device per step, DESIGN.md's model FLOPs
    flops_note: str
    bytes_accessed: float
    collective_bytes: float
    estimated_step_seconds: float
    estimate_source: str
    tokens_per_step: int
    tokens_per_second: float
    mfu: float
    grad_accum_steps: int
    compile_seconds: float
    peak_flops: float  # per device
    spec_source: str
    out_of_memory: str = ""  # the TPU compiler's refusal, when it would not fit

    def line(self) -> str:
        """One JSON object; a figure that could not be had (NaN) is null."""
        return json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v
                           for k, v in dataclasses.asdict(self).items()})


def _program_report(config, derived, topology, spec, devices, program, compiled, cost):
    """Put memory, FLOPs and the estimate of one program together."""
    train = program == "train_step"
    accum = int(config.train.grad_accum_steps) if train else 1
    rows = derived.micro_batch_size
    tokens = rows * accum * config.data.seq_len
    n = len(devices)
    per_token = metrics.flops_per_token(config.model, derived.head_dim, config.data.seq_len)
    formula = per_token * (1 if train else 1 / 3) * tokens / n
    note = cost.note
    extra = 0.0
    if attention_impl(config, devices) == "splash":
        extra = splash_attention_flops(config, derived, rows, train) / n
        ring = (derived.mesh_shape["sequence"] > 1
                and config.model.context_parallel == "ring")  # jaxlm.attention.ring_kernels
        note += (f"; {'the ring' if ring else 'splash'} attention (Pallas kernels the cost model "
                 "counts as ~0) added by formula"
                 + ("" if not train or _saves_attention(config.model.remat)
                    else ", with its remat recompute"))
    micro_s, source = estimate_seconds(cost, spec, extra)
    if compiled.out_of_memory:
        micro_s, source = float("nan"), f"none: {compiled.out_of_memory}"
    step_s = micro_s * accum
    outputs = compiled.output_bytes - compiled.alias_bytes  # donated state is updated in place
    total = compiled.argument_bytes + compiled.temp_bytes + outputs
    return Report(
        program=program, topology=topology.name, topology_name=topology.topology_name,
        num_slices=topology.num_slices, chips=topology.chips, devices=n,
        fits=total <= spec.hbm_bytes and not compiled.out_of_memory,
        argument_bytes=compiled.argument_bytes, temp_bytes=compiled.temp_bytes, output_bytes=outputs, total_bytes=total,
        hbm_bytes=int(spec.hbm_bytes), headroom_bytes=int(spec.hbm_bytes - total),
        flops=(cost.flops + extra) * accum, flops_formula=formula, flops_note=note,
        bytes_accessed=cost.bytes_accessed * accum, collective_bytes=cost.collective_bytes * accum,
        estimated_step_seconds=step_s,
        estimate_source=source + (f"; x {accum} microbatches" if accum > 1 else ""),
        tokens_per_step=tokens, tokens_per_second=tokens / step_s,
        mfu=formula / (step_s * spec.peak_flops), grad_accum_steps=accum,
        compile_seconds=compiled.compile_seconds, peak_flops=spec.peak_flops,
        spec_source=spec.source, out_of_memory=compiled.out_of_memory)


def check_config(config, topology: Topology) -> config_lib.Derived:
    """The config's own errors for this many devices, before anything is compiled."""
    n = topology.chips
    if topology.platform == "tpu" and topology.generation == "v4":
        n *= 2  # compile-only v4 devices are TensorCores
    derived = config_lib.validate(config, n)
    data, slices = derived.mesh_shape["data"], topology.num_slices
    if data % slices:  # jaxlm.sharding.make_mesh puts the data axis across the slices
        raise config_lib.ConfigError(
            f"config.mesh.data={data} is invalid for --num_slices={slices}: the data axis is "
            f"the one that crosses slices; set --config.mesh.data to a multiple of {slices}")
    return derived


def _raw_cost(compiled: Compiled) -> Cost:
    note = ("none: the compiler stopped, out of memory" if compiled.out_of_memory else
            "XLA's raw count, NOT corrected: each loop body (the layer scan, the loss_chunks "
            "loop) counted once")
    return Cost(compiled.flops, compiled.bytes_accessed, compiled.optimal_seconds,
                compiled.collective_bytes, note)


def compile_for(config, topology: str | Topology, num_slices: int = 1,
                programs=PROGRAMS, hbm_bytes: float | None = None,
                cache: dict | None = None, loop_correction: bool = True) -> list[Report]:
    """Compile `programs` of `config` for a topology name ("v5p-128", "v5e:2x4", "cpu:8");
    one Report each. Raises TopologyError / ConfigError before compiling anything.
    `loop_correction=False` skips the two small programs (memory only, FLOPs and time as
    XLA counts them)."""
    topo = topology if isinstance(topology, Topology) else parse_topology(topology, num_slices)
    check_config(config, topo)
    devices = topology_devices(topo)
    derived = config_lib.validate(config, len(devices))
    spec = device_spec(topo, len(devices), hbm_bytes)
    reports = []
    for program in programs:
        compiled = compile_program(config, devices, topo, program, cache)
        cost = (layer_corrected_cost(config, devices, topo, program, cache)
                if loop_correction and not compiled.out_of_memory else _raw_cost(compiled))
        reports.append(_program_report(config, derived, topo, spec, devices, program,
                                       compiled, cost))
    return reports


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_report(r: Report) -> str:
    """The human-readable version of a Report."""
    unit = ("device" if r.topology.startswith("cpu") else
            "device (TensorCore)" if r.devices != r.chips else "chip")
    verdict = "fits" if r.fits else f"DOES NOT FIT: {_gib(-r.headroom_bytes)} over"
    if r.out_of_memory:
        verdict = f"DOES NOT FIT: the compiler stopped ({r.out_of_memory})"
    return "\n".join([
        f"{r.program} on {r.topology} ({r.topology_name}, {r.num_slices} slice(s), {r.chips} "
        f"chips, {r.devices} devices), compiled in {r.compile_seconds:.1f} s",
        f"  memory per {unit}: arguments {_gib(r.argument_bytes)}, temporaries "
        f"{_gib(r.temp_bytes)}, outputs not aliased {_gib(r.output_bytes)}; total "
        f"{_gib(r.total_bytes)} of {_gib(r.hbm_bytes)} HBM, headroom {_gib(r.headroom_bytes)}: "
        f"{verdict}",
        f"  FLOPs per {unit} per step: {r.flops_formula:.4g} by the formula (model FLOPs, "
        f"DESIGN.md); {r.flops:.4g} by the compiler ({r.flops_note})",
        f"  ESTIMATED step time {r.estimated_step_seconds * 1e3:.1f} ms ({r.estimate_source}) "
        f"-> ~{r.tokens_per_second:,.0f} tokens/s, MFU ~{100 * r.mfu:.1f}% (an estimate, "
        f"not a measurement)",
        f"  figures: {r.spec_source}",
    ])


# ---------------------------------------------------------------------------- planner


@dataclasses.dataclass
class Candidate:
    """One setup the planner considers: the config overrides and what is known of it."""

    overrides: dict
    analytic_bytes: float
    analytic_seconds: float
    tokens_per_step: int
    model_flops: float  # per device per step, DESIGN.md's formula
    peak_flops: float  # per device
    report: Report | None = None  # the compiled train step, when it was compiled
    timed: bool = False  # report's step time is loop-corrected (else: analytic)

    @property
    def fits(self) -> bool:
        return self.report.fits if self.report else False

    @property
    def seconds(self) -> float:
        return self.report.estimated_step_seconds if self.timed else self.analytic_seconds

    @property
    def time_source(self) -> str:
        return "compiled" if self.timed else "analytic"


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def _activation_bytes_per_layer(m, head_dim, rows, seq, tensor, policy,
                                impl: str) -> tuple[float, float]:
    """(saved between forward and backward, working set of one layer) per device, bytes."""
    b = _dtype_bytes(m.dtype)
    tokens = rows * seq
    attn_proj = (m.n_heads + 2 * m.n_kv_heads) * head_dim / tensor
    dots = tokens * b * (3 * m.d_model + attn_proj + 2 * m.d_ff / tensor)
    if impl == "splash":  # a kernel: its output and log-sum-exp, no scores in memory
        scores = tokens * m.n_heads / tensor * (head_dim * b + 4)
    else:  # xla attention: float32 scores and the probabilities, 62.5% of the square
        scores = tokens * m.n_heads / tensor * seq * 0.625 * (4 + b)
    everything = dots + scores + tokens * b * (3 * m.d_model + 2 * m.d_ff / tensor)
    saved = {"none": everything, "full": tokens * b * m.d_model, "save_dots": dots + scores}
    return saved.get(policy, dots), everything


def analytic_memory_bytes(config, derived, impl: str = "xla") -> float:
    """A quick per-device memory estimate, to prune before compiling: parameters, Adam state
    and gradients in float32 (16 bytes a parameter) over the shards, accumulated gradients,
    activations the remat policy keeps, one layer's working set, and the logits."""
    m, t, shape = config.model, config.train, derived.mesh_shape
    shards = shape["fsdp"] * shape["tensor"] * shape["sequence"]  # jaxlm.sharding's weight rules
    state = derived.n_params * (16 + (4 if t.grad_accum_steps > 1 else 0)) / shards
    rows = derived.per_device_batch_size / shape["sequence"]
    saved, working = _activation_bytes_per_layer(m, derived.head_dim, rows, config.data.seq_len,
                                                 shape["tensor"], m.remat, impl)
    logits = rows * config.data.seq_len * m.vocab_size / shape["tensor"] * 4 * 3 / t.loss_chunks
    return state + m.n_layers * saved + working + logits


def _recompute_fraction(policy: str) -> float:
    """Share of the forward pass the backward runs again, by remat policy."""
    return {"none": 0.0, "full": 1.0, "save_dots": 0.0, "save_attention": 0.9}.get(policy, 0.15)


def analytic_step_seconds(config, derived, spec: DeviceSpec) -> float:
    """A quick step time: model FLOPs (plus remat recompute) at peak, or the FSDP gathers,
    gradient reductions and tensor-parallel all-reduces over ICI, whichever is slower; per
    microbatch, times the microbatches."""
    m, t, shape = config.model, config.train, derived.mesh_shape
    n = math.prod(shape.values())
    seq, accum = config.data.seq_len, t.grad_accum_steps
    tokens_micro = derived.micro_batch_size * seq
    fpt = metrics.flops_per_token(m, derived.head_dim, seq)
    compute = fpt * (1 + _recompute_fraction(m.remat) / 3) * tokens_micro / n / spec.peak_flops
    p = derived.n_params
    fsdp, tensor, data = shape["fsdp"], shape["tensor"], shape["data"]
    gathers = 3 if m.remat == "full" else 2
    comm = (p * _dtype_bytes(m.dtype) / tensor * (fsdp - 1) / fsdp * gathers
            + p * 4 / tensor * (fsdp - 1) / fsdp
            + 2 * p * 4 / (fsdp * tensor) * (data - 1) / data
            + 2 * (gathers + 2) * m.n_layers * tokens_micro / (data * fsdp) * m.d_model
            * _dtype_bytes(m.dtype) * (tensor - 1) / tensor)
    return max(compute, comm / spec.ici_bytes_per_s) * accum


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _mesh_splits(n: int, max_tensor: int = 8):
    """(data, fsdp, tensor) with data * fsdp * tensor = n, powers of the divisors."""
    for tensor in (d for d in _divisors(n) if d <= max_tensor):
        for data in _divisors(n // tensor):
            yield data, n // tensor // data, tensor


def candidate_overrides(config, n_devices: int, loss_chunks=(1, 4, 16)):
    """Every combination of remat policy, gradient accumulation, loss chunks and mesh split
    (the sequence axis as configured), as `--config.*` overrides."""
    accums = _divisors(int(config.train.global_batch_size))
    chunks = [c for c in loss_chunks if config.data.seq_len % c == 0]
    seq = int(config.mesh.sequence)
    for remat, accum, chunk, (data, fsdp, tensor) in itertools.product(
            config_lib.REMAT_POLICIES, accums, chunks, _mesh_splits(n_devices // seq)):
        yield {"model.remat": remat, "train.grad_accum_steps": accum, "train.loss_chunks": chunk,
               "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
               "mesh.sequence": seq}


def with_overrides(config, overrides: dict):
    new = config.copy_and_resolve_references()
    for path, value in overrides.items():
        node = new
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return new


def analytic_candidates(config, topology: Topology, spec: DeviceSpec, devices: list):
    """Candidates that validate and fit by the analytic estimate (with 10% slack), fastest
    first; ties go to fewer microbatches, then fewer loss chunks."""
    found, n_devices = [], len(devices)
    for overrides in candidate_overrides(config, n_devices):
        trial = with_overrides(config, overrides)
        try:
            derived = config_lib.validate(trial, n_devices)
        except config_lib.ConfigError:
            continue
        mem = analytic_memory_bytes(trial, derived, attention_impl(trial, devices))
        if mem <= 1.1 * spec.hbm_bytes:
            tokens = trial.train.global_batch_size * trial.data.seq_len
            flops = metrics.flops_per_token(trial.model, derived.head_dim,
                                            trial.data.seq_len) * tokens / n_devices
            found.append(Candidate(overrides, mem, analytic_step_seconds(trial, derived, spec),
                                   tokens, flops, spec.peak_flops))
    found.sort(key=lambda c: (round(c.analytic_seconds, 4), c.overrides["train.grad_accum_steps"],
                              c.overrides["train.loss_chunks"], c.analytic_bytes))
    return found


def load_cache(path: str) -> dict:
    p = pathlib.Path(path)
    return json.loads(p.read_text()) if path and p.exists() else {}


def save_cache(path: str, cache: dict) -> None:
    if path:
        p = pathlib.Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(cache))


def _diverse(cands: list[Candidate], k: int) -> list[Candidate]:
    """The best `k` candidates, but the best of each remat policy first: neighbours in the
    analytic ranking differ only in the mesh and would fit, or not, together."""
    firsts = list({c.overrides["model.remat"]: c for c in reversed(cands)}.values())[::-1]
    firsts.sort(key=cands.index)
    rest = [c for c in cands if c not in firsts]
    return (firsts + rest)[:k]


class _Budget:
    """Wall-clock budget for compiles: is there time for `n` more, judged by the slowest
    compile so far (or a guess before the first)."""

    def __init__(self, seconds: float, log):
        self.end, self.log = time.perf_counter() + seconds, log
        self.slowest = {}  # kind of work -> its slowest time so far

    def allows(self, kind: str, guess: float) -> bool:
        """Time left for one more `kind`, judged by the slowest so far, else by `guess`."""
        left, need = self.end - time.perf_counter(), self.slowest.get(kind, guess)
        if left < need:
            self.log(f"plan: {left:.0f} s of budget left, not enough for {kind} "
                     f"(~{need:.0f} s); stopping")
            return False
        return True

    def timed(self, kind: str, fn):
        start = time.perf_counter()
        result = fn()
        self.slowest[kind] = max(self.slowest.get(kind, 0.0), time.perf_counter() - start)
        return result


def plan(config, topology: str, num_slices: int = 1, budget_s: float = 840,
         max_compiles: int = 3, hbm_bytes: float | None = None, cache: dict | None = None,
         log=print) -> list[Candidate]:
    """Candidates that fit by the analytic estimate, fastest first; then, while `budget_s`
    lasts, (1) the train step of the best `max_compiles` compiled for its real memory, and
    (2) for those that fit, the two small programs that correct XLA's loop count, for a
    compiled step-time estimate. Returns fitting compiled setups first, by step time."""
    topo = parse_topology(topology, num_slices)
    check_config(config, topo)
    devices = topology_devices(topo)
    spec = device_spec(topo, len(devices), hbm_bytes)
    cands = analytic_candidates(config, topo, spec, devices)
    log(f"plan: {len(cands)} setups fit by the analytic estimate; compiling the best "
        f"{max_compiles} within {budget_s:.0f} s")
    budget, cache = _Budget(budget_s, log), ({} if cache is None else cache)

    def compile_candidate(cand, correct: bool, kind: str):
        trial = with_overrides(config, cand.overrides)
        cand.report = budget.timed(kind, lambda: compile_for(
            trial, topo, programs=("train_step",), hbm_bytes=hbm_bytes, cache=cache,
            loop_correction=correct)[0])
        cand.timed = correct

    full, small = "a train step compile", "a step-time estimate (1- and 2-layer programs)"
    for cand in _diverse(cands, max_compiles):
        if not budget.allows(full, 0.0):
            break
        compile_candidate(cand, correct=False, kind=full)
        log(f"plan: {_override_text(cand.overrides)}: {_gib(cand.report.total_bytes)} per "
            f"device, {'fits' if cand.fits else 'does not fit'}")
    for cand in sorted((c for c in cands if c.fits), key=lambda c: c.analytic_seconds):
        if not budget.allows(small, 2 * budget.slowest.get(full, 0.0)):
            break
        compile_candidate(cand, correct=True, kind=small)
        log(f"plan: {_override_text(cand.overrides)}: ~{cand.seconds:.3f} s a step (estimate)")
    return sorted(cands, key=_rank)


def _rank(c: Candidate) -> tuple:
    """Compiled and fitting first, those with a compiled step time before those with only
    the analytic one (a lower bound: all at peak); then the rest, analytic."""
    return (not c.fits, not c.timed, c.report is None, c.seconds)


def _override_text(overrides: dict) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


def format_plan(cands: list[Candidate], config_path: str) -> str:
    """Ranked table (compiled setups first, then the best analytic ones) and the best
    fitting setup as a train command line; says plainly when nothing fits."""
    lines = [f"{'rank':>4} {'remat':<24} {'accum':>5} {'chunks':>6} {'data/fsdp/tensor':>16} "
             f"{'GiB/device':>10} {'fits':>5} {'step s (est.)':>13} {'tokens/s':>10} "
             f"{'MFU':>6}  memory, time from"]
    shown = [c for c in cands if c.report]
    shown += [c for c in cands if not c.report][:max(0, 12 - len(shown))]
    for i, c in enumerate(shown, 1):
        o, r = c.overrides, c.report
        mesh = f"{o['mesh.data']}/{o['mesh.fsdp']}/{o['mesh.tensor']}"
        memory = r.total_bytes if r else c.analytic_bytes
        fits = ("yes" if c.fits else "NO") if r else "?"
        mfu = c.model_flops / (c.seconds * c.peak_flops)
        timing = (f"{c.seconds:>13.3f} {c.tokens_per_step / c.seconds:>10,.0f} "
                  f"{100 * mfu:>5.1f}%" if fits != "NO" else f"{'-':>13} {'-':>10} {'-':>6}")
        lines.append(f"{i:>4} {o['model.remat']:<24} {o['train.grad_accum_steps']:>5} "
                     f"{o['train.loss_chunks']:>6} {mesh:>16} {memory / 2**30:>10.2f} "
                     f"{fits:>5} {timing}  {'compiled' if r else 'analytic'}, "
                     f"{c.time_source if fits != 'NO' else '-'}")
    if len(cands) > len(shown):
        lines.append(f"     ... {len(cands) - len(shown)} more setups fit by the analytic estimate")
    if shown and shown[0].report:
        lines.append(f"figures: {shown[0].report.spec_source}; step times are estimates, "
                     "analytic ones a lower bound (model FLOPs at peak)")
    best = next((c for c in cands if c.fits), None)
    if best is not None:
        lines.append(f"best ({best.time_source} estimate): python -m jaxlm.train "
                     f"--config={config_path} {_override_text(best.overrides)}")
        return "\n".join(lines)
    tried = [c for c in cands if c.report]
    if not cands:
        why = "no setup fits even by the analytic memory estimate"
    elif not tried:
        why = "no candidate could be compiled within the budget (raise --plan_budget_s)"
    else:
        least = min(tried, key=lambda c: c.report.total_bytes).report
        why = (f"the smallest of the {len(tried)} compiled setups needs "
               f"{_gib(least.total_bytes)} per device of {_gib(least.hbm_bytes)}")
    lines.append(f"NOTHING FITS: {why}; use a bigger slice, a smaller model or a shorter "
                 "data.seq_len")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- CLI

def define_flags() -> None:
    """The CLI's flags, defined only when run as a program: a library import (tests, the
    benchmarks) must not claim --config, which jaxlm.train defines too."""
    config_flags.DEFINE_config_file("config", "configs/tiny.py", "A config file under configs/.")
    flags.DEFINE_string("topology", "v5p-8", "A slice: " + "; ".join(TOPOLOGY_FORMS))
    flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (multi-slice).")
    flags.DEFINE_bool("json", False, "One JSON object per compiled program, one a line.")
    flags.DEFINE_float("hbm_gib", None, "Memory per device in GiB instead of the chip's.")
    flags.DEFINE_bool("plan", False, "Search remat x accumulation x loss chunks x mesh.")
    flags.DEFINE_float("plan_budget_s", 840, "Stop compiling candidates after this.")
    flags.DEFINE_integer("plan_max_compiles", 3, "Compile at most this many candidates.")
    flags.DEFINE_string("cache", str(pathlib.Path.home() / ".cache/jaxlm/aot.json"),
                        "JSON file of compile results by program fingerprint (jax and libtpu "
                        "versions included); '' for none.")


_REEXEC = "JAXLM_AOT_REEXEC"


def _ensure_cpu_devices(topology: Topology) -> None:
    """cpu:N needs N host devices, fixed when JAX starts: re-run this command with them."""
    wanted = f"--xla_force_host_platform_device_count={topology.chips}"
    flags_now = os.environ.get("XLA_FLAGS", "")
    have = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags_now)
    if have and int(have.group(1)) >= topology.chips and os.environ.get("JAX_PLATFORMS") == "cpu":
        return
    if os.environ.get(_REEXEC):
        raise TopologyError(f"could not get {topology.chips} CPU devices (XLA_FLAGS={flags_now!r})")
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_REEXEC: "1"},
               XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags_now)
               + " " + wanted)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "jaxlm.aot", *sys.argv[1:]], env)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return USAGE_EXIT


def main(argv) -> int:
    if len(argv) > 1:
        return _fail(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    config = f.config
    hbm = f.hbm_gib * 2**30 if f.hbm_gib else None
    try:
        topo = parse_topology(f.topology, f.num_slices)
        check_config(config, topo)
        if topo.platform == "cpu":
            _ensure_cpu_devices(topo)
        cache = load_cache(f.cache)
        if f.plan:
            start = time.perf_counter()
            cands = plan(config, topo.name, topo.num_slices, f.plan_budget_s, f.plan_max_compiles,
                         hbm, cache, log=lambda s: print(s, file=sys.stderr, flush=True))
            save_cache(f.cache, cache)
            print(format_plan(cands, config_flags.get_config_filename(f["config"])))
            print(f"plan took {time.perf_counter() - start:.0f} s")
            return 0 if any(c.fits for c in cands) else NO_FIT_EXIT
        reports = compile_for(config, topo, hbm_bytes=hbm, cache=cache)
        save_cache(f.cache, cache)
    except (TopologyError, config_lib.ConfigError) as e:
        return _fail(str(e))
    for r in reports:
        print(r.line() if f.json else format_report(r), flush=True)
    return 0 if all(r.fits for r in reports) else NO_FIT_EXIT


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
