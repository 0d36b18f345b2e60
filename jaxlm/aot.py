"""`python -m jaxlm.aot --config=configs/7b.py --topology=v5p-128`: will it fit, and how fast?

Compiles the real train and eval steps for a named TPU slice on any host (libtpu's compiler
runs on the CPU; no TPU needed; slice names are jaxlm.topology's), or for `cpu:N` simulated
devices, and reports per device: memory (arguments, temporaries, outputs not aliased,
against the chip's HBM), FLOPs per step (docs/DESIGN.md's formula, and the compiler's own count
with its loops corrected), and an estimated step time with the tokens/s and MFU it implies.
`--plan` (jaxlm.plan) searches remat policy, gradient accumulation, loss chunks and the mesh
split for the fastest setup that fits.

As a library: `compile_for(config, "v5p-128")` returns one `Report` per program (the
memory and cost of each come from jaxlm.program_cost); `jaxlm.plan.plan()` returns the
ranked candidates. Exit codes: 0 fits, 3 does not fit, 2 a usage or config error.

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
import json
import math
import os
import pathlib
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from jaxlm import cli, config_checks, kernel_choice, metrics, platforms
from jaxlm import config as config_lib
from jaxlm.program_cost import ProgramCost, compile_program, layer_corrected, load_cache, save_cache
from jaxlm.topology import (
    TOPOLOGY_FORMS,
    DeviceSpec,
    Topology,
    TopologyError,
    device_count,
    device_spec,
    parse_topology,
    topology_devices,
)

USAGE_EXIT, NO_FIT_EXIT = 2, 3
PROGRAMS = ("train_step", "eval_step")


# -------------------------------------------------------------------------- estimates


def attention_impl(config, devices) -> str:
    """The attention the step compiles to: "auto" decided by the devices (splash on a TPU
    slice, even from a CPU host), as jaxlm.step.build decides it."""
    shape = config_checks.resolve_mesh_shape(config.mesh, len(devices))
    return kernel_choice.attention_impl(config, shape, devices[0].platform)


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
    return (
        max(flops / spec.peak_flops, bytes_accessed / spec.hbm_bytes_per_s)
        + coll_bytes / spec.ici_bytes_per_s
    )


def estimate_seconds(
    cost: ProgramCost, spec: DeviceSpec, extra_flops: float = 0.0
) -> tuple[float, str]:
    """Seconds per microbatch per device and which estimate it is. XLA's own optimal_seconds
    where it is plausible (positive, and no faster than the peak allows for the FLOPs);
    otherwise our roofline. `extra_flops` (kernels the cost model misses) run at peak."""
    roof = roofline_seconds(
        cost.flops + extra_flops, cost.bytes_accessed, cost.collective_bytes, spec
    )
    xla = cost.optimal_seconds + extra_flops / spec.peak_flops
    floor = (cost.flops + extra_flops) / spec.peak_flops
    if math.isfinite(xla) and cost.optimal_seconds > 0 and floor * 0.9 <= xla <= 100 * roof:
        return xla, "XLA optimal_seconds, extrapolated over layers"
    why = (
        "missing"
        if not math.isfinite(cost.optimal_seconds)
        else f"implausible ({cost.optimal_seconds:.3g} s)"
    )
    return roof, (
        f"roofline: max(FLOPs/peak, bytes/HBM bandwidth) + collective bytes/ICI "
        f"bandwidth (XLA optimal_seconds {why})"
    )


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
    flops_formula: float  # per device per step, docs/DESIGN.md's model FLOPs
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
        return json.dumps(
            {
                k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in dataclasses.asdict(self).items()
            }
        )


def _program_report(config, derived, topology, spec, devices, program, cost: ProgramCost) -> Report:
    """Put memory, FLOPs and the estimate of one program together."""
    train = program == "train_step"
    accum = int(config.train.grad_accum_steps) if train else 1
    rows = derived.micro_batch_size
    tokens = rows * accum * config.data.seq_len
    n = len(devices)
    per_token = metrics.flops_per_token(config.model, derived.head_dim, config.data.seq_len)
    formula = per_token * (1 if train else 1 / 3) * tokens / n
    note = cost.cost_note
    extra = 0.0
    if attention_impl(config, devices) == "splash":
        extra = splash_attention_flops(config, derived, rows, train) / n
        ring = (
            derived.mesh_shape["sequence"] > 1 and config.model.context_parallel == "ring"
        )  # jaxlm.attention.ring_kernels
        note += (
            f"; {'the ring' if ring else 'splash'} attention (Pallas kernels the cost model "
            "counts as ~0) added by formula"
            + (
                ""
                if not train or _saves_attention(config.model.remat)
                else ", with its remat recompute"
            )
        )
    micro_s, source = estimate_seconds(cost, spec, extra)
    if cost.out_of_memory:
        micro_s, source = float("nan"), f"none: {cost.out_of_memory}"
    step_s = micro_s * accum
    outputs = cost.output_bytes - cost.alias_bytes  # donated state is updated in place
    total = cost.argument_bytes + cost.temp_bytes + outputs
    return Report(
        program=program,
        topology=topology.name,
        topology_name=topology.topology_name,
        num_slices=topology.num_slices,
        chips=topology.chips,
        devices=n,
        fits=total <= spec.hbm_bytes and not cost.out_of_memory,
        argument_bytes=cost.argument_bytes,
        temp_bytes=cost.temp_bytes,
        output_bytes=outputs,
        total_bytes=total,
        hbm_bytes=int(spec.hbm_bytes),
        headroom_bytes=int(spec.hbm_bytes - total),
        flops=(cost.flops + extra) * accum,
        flops_formula=formula,
        flops_note=note,
        bytes_accessed=cost.bytes_accessed * accum,
        collective_bytes=cost.collective_bytes * accum,
        estimated_step_seconds=step_s,
        estimate_source=source + (f"; x {accum} microbatches" if accum > 1 else ""),
        tokens_per_step=tokens,
        tokens_per_second=tokens / step_s,
        mfu=formula / (step_s * spec.peak_flops),
        grad_accum_steps=accum,
        compile_seconds=cost.compile_seconds,
        peak_flops=spec.peak_flops,
        spec_source=spec.source,
        out_of_memory=cost.out_of_memory,
    )


def check_config(config, topology: Topology) -> config_lib.Derived:
    """The config's own errors for this many devices, before anything is compiled."""
    derived = config_lib.validate(config, device_count(topology))
    data, slices = derived.mesh_shape["data"], topology.num_slices
    if data % slices:  # jaxlm.sharding.make_mesh puts the data axis across the slices
        raise config_lib.ConfigError(
            f"config.mesh.data={data} is invalid for --num_slices={slices}: the data axis is "
            f"the one that crosses slices; set --config.mesh.data to a multiple of {slices}"
        )
    return derived


def compile_for(
    config,
    topology: str | Topology,
    num_slices: int = 1,
    programs=PROGRAMS,
    hbm_bytes: float | None = None,
    cache: dict | None = None,
    loop_correction: bool = True,
) -> list[Report]:
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
        cost = compile_program(config, devices, topo, program, cache)
        if loop_correction and not cost.out_of_memory:
            cost = layer_corrected(cost, config, devices, topo, program, cache)
        reports.append(_program_report(config, derived, topo, spec, devices, program, cost))
    return reports


def format_gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_report(r: Report) -> str:
    """The human-readable version of a Report."""
    unit = (
        "device"
        if r.topology.startswith("cpu")
        else "device (TensorCore)"
        if r.devices != r.chips
        else "chip"
    )
    verdict = "fits" if r.fits else f"DOES NOT FIT: {format_gib(-r.headroom_bytes)} over"
    if r.out_of_memory:
        verdict = f"DOES NOT FIT: the compiler stopped ({r.out_of_memory})"
    return "\n".join(
        [
            f"{r.program} on {r.topology} ({r.topology_name}, {r.num_slices} slice(s), {r.chips} "
            f"chips, {r.devices} devices), compiled in {r.compile_seconds:.1f} s",
            f"  memory per {unit}: arguments {format_gib(r.argument_bytes)}, temporaries "
            f"{format_gib(r.temp_bytes)}, outputs not aliased {format_gib(r.output_bytes)}; total "
            f"{format_gib(r.total_bytes)} of {format_gib(r.hbm_bytes)} HBM, headroom "
            f"{format_gib(r.headroom_bytes)}: {verdict}",
            f"  FLOPs per {unit} per step: {r.flops_formula:.4g} by the formula (model FLOPs, "
            f"docs/DESIGN.md); {r.flops:.4g} by the compiler ({r.flops_note})",
            f"  ESTIMATED step time {r.estimated_step_seconds * 1e3:.1f} ms ({r.estimate_source}) "
            f"-> ~{r.tokens_per_second:,.0f} tokens/s, MFU ~{100 * r.mfu:.1f}% (an estimate, "
            f"not a measurement)",
            f"  figures: {r.spec_source}",
        ]
    )


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
    flags.DEFINE_string(
        "cache",
        str(pathlib.Path.home() / ".cache/jaxlm/aot.json"),
        "JSON file of compile results by program fingerprint (jax and libtpu "
        "versions included); '' for none.",
    )


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
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        **{_REEXEC: "1"},
        XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags_now)
        + " "
        + wanted,
    )
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "jaxlm.aot", *sys.argv[1:]], env)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return USAGE_EXIT


def main(argv) -> int:
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
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
            from jaxlm import plan  # the planner builds on this module

            start = time.perf_counter()
            cands = plan.plan(
                config,
                topo.name,
                topo.num_slices,
                f.plan_budget_s,
                f.plan_max_compiles,
                hbm,
                cache,
                log=lambda s: print(s, file=sys.stderr, flush=True),
            )
            save_cache(f.cache, cache)
            print(plan.format_plan(cands, config_flags.get_config_filename(f["config"])))
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
    app.run(main, flags_parser=cli.parse_flags)
