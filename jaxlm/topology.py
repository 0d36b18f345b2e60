"""Slice names to devices: `v5p-128` -> libtpu's v5p:4x4x4 -> 64 compile-only TPU devices.

A TPU slice is described, not attached (`jax.experimental.topologies.get_topology_desc`):
libtpu's compiler runs on any host, so jaxlm.aot can compile for a slice it does not have.
`cpu:N` stands for N simulated CPU devices. Each device comes with its chip's figures (HBM,
peak FLOP/s, bandwidths) from the spec sheets in jaxlm.metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re

import jax

from jaxlm import metrics
from jaxlm.errors import TopologyError

INSTALL_TPU = "pip install -e '.[tpu]'"
TOPOLOGY_FORMS = (
    "v4-N, v5p-N (N counts TensorCores, 2 per chip: v5p-128 is 64 chips)",
    "v5e-N, v6e-N (N counts chips: v5e-256 is 16x16)",
    "an explicit libtpu topology such as v5p:4x4x4 or v5e:2x4",
    "cpu:N (N simulated CPU devices)",
)
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}  # in the slice names' count
_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}  # torus dimensions
# cpu:N has no spec sheet: its devices share the host's RAM, and these nominal rates (a
# 2-core VM's measured matmul rate, benchmarks/results/NOTES.md; DDR and memcpy orders of
# magnitude) only make the estimate's arithmetic run. Labelled "nominal" wherever printed.
_CPU_NOMINAL = {"peak_flops": 100e9, "hbm_bytes_per_s": 20e9, "ici_bytes_per_s": 10e9}


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
    return tuple(2**e for e in exps)


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
            raise _unknown(
                name, f"{gen}-N needs N a power of two (and at least {_CORES_PER_CHIP[gen]})"
            )
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
        spec = DeviceSpec(
            ram * share,
            _CPU_NOMINAL["peak_flops"] * share,
            _CPU_NOMINAL["hbm_bytes_per_s"] * share,
            _CPU_NOMINAL["ici_bytes_per_s"] * share,
            f"host RAM / {n_devices} devices; nominal CPU rates, not a spec",
        )
    else:
        chip = metrics.TPU_CHIP_SPECS[topology.generation]
        peak = dict(metrics.PEAK_FLOPS)[
            f"TPU {topology.generation}" if topology.generation != "v6e" else "TPU v6"
        ]
        share = topology.chips / n_devices
        spec = DeviceSpec(
            chip["hbm_bytes"] * share,
            peak * share,
            chip["hbm_bytes_per_s"] * share,
            chip["ici_bytes_per_s"] * share,
            f"TPU {topology.generation} published spec"
            + (
                f", per TensorCore ({n_devices // topology.chips} devices a chip)"
                if share != 1
                else ""
            ),
        )
    if hbm_bytes is not None:
        spec = dataclasses.replace(
            spec, hbm_bytes=hbm_bytes, source=spec.source + "; memory overridden (--hbm_gib)"
        )
    return spec


def topology_devices(topology: Topology) -> list:
    """The slice's devices: compile-only TPU devices from libtpu, or this process's CPUs."""
    if topology.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < topology.chips:
            raise TopologyError(
                f"--topology={topology.name} needs {topology.chips} CPU devices but this process "
                f"has {len(devices)}; set XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{topology.chips} JAX_PLATFORMS=cpu before JAX starts (the CLI does this itself)"
            )
        return devices[: topology.chips]
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError(
            "libtpu is not installed: it holds the TPU compiler that "
            f"--topology={topology.name} needs; install it with {INSTALL_TPU}"
        )
    from jax.experimental import topologies

    # Compiling touches no TPU, so libtpu's one-process-per-host lock (a file in /tmp) only
    # makes a second compile (a test run, another planner) fail to start.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    describe = functools.partial(
        topologies.get_topology_desc,
        topology.topology_name,
        platform="tpu",
        num_slices=topology.num_slices,
    )
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


def device_count(topology: Topology) -> int:
    """JAX devices the slice compiles for: compile-only v4 devices are TensorCores, two a
    chip; every other kind has one device a chip."""
    return topology.chips * (2 if topology.platform == "tpu" and topology.generation == "v4" else 1)
