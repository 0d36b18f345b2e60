"""`python -m jaxlm.aot --plan`: the fastest setup of a config that fits a slice.

Searches remat policy x gradient accumulation x loss chunks x the mesh split. Every
candidate is first sized by a quick analytic estimate (memory, step time), which prunes the
thousands to a ranked few; then, within a wall-clock budget, the best few are compiled by
jaxlm.aot for their real memory, and those that fit get its loop-corrected step-time
estimate. `plan()` returns the ranked candidates, `format_plan()` the table and the best
setup as a train command line.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

from jaxlm import aot, metrics
from jaxlm import config as config_lib
from jaxlm.topology import (
    DeviceSpec,
    Topology,
    device_spec,
    parse_topology,
    topology_devices,
)


@dataclasses.dataclass
class Candidate:
    """One setup the planner considers: the config overrides and what is known of it."""

    overrides: dict
    analytic_bytes: float
    analytic_seconds: float
    tokens_per_step: int
    model_flops: float  # per device per step, docs/DESIGN.md's formula
    peak_flops: float  # per device
    report: aot.Report | None = None  # the compiled train step, when it was compiled
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


def _activation_bytes_per_layer(
    m, head_dim, rows, seq, tensor, policy, impl: str
) -> tuple[float, float]:
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
    saved, working = _activation_bytes_per_layer(
        m, derived.head_dim, rows, config.data.seq_len, shape["tensor"], m.remat, impl
    )
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
    comm = (
        p * _dtype_bytes(m.dtype) / tensor * (fsdp - 1) / fsdp * gathers
        + p * 4 / tensor * (fsdp - 1) / fsdp
        + 2 * p * 4 / (fsdp * tensor) * (data - 1) / data
        + 2
        * (gathers + 2)
        * m.n_layers
        * tokens_micro
        / (data * fsdp)
        * m.d_model
        * _dtype_bytes(m.dtype)
        * (tensor - 1)
        / tensor
    )
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
        config_lib.REMAT_POLICIES, accums, chunks, _mesh_splits(n_devices // seq)
    ):
        yield {
            "model.remat": remat,
            "train.grad_accum_steps": accum,
            "train.loss_chunks": chunk,
            "mesh.data": data,
            "mesh.fsdp": fsdp,
            "mesh.tensor": tensor,
            "mesh.sequence": seq,
        }


def analytic_candidates(config, topology: Topology, spec: DeviceSpec, devices: list):
    """Candidates that validate and fit by the analytic estimate (with 10% slack), fastest
    first; ties go to fewer microbatches, then fewer loss chunks."""
    found, n_devices = [], len(devices)
    for overrides in candidate_overrides(config, n_devices):
        trial = config_lib.with_fields(config, overrides)
        try:
            derived = config_lib.validate(trial, n_devices)
        except config_lib.ConfigError:
            continue
        mem = analytic_memory_bytes(trial, derived, aot.attention_impl(trial, devices))
        if mem <= 1.1 * spec.hbm_bytes:
            tokens = trial.train.global_batch_size * trial.data.seq_len
            flops = (
                metrics.flops_per_token(trial.model, derived.head_dim, trial.data.seq_len)
                * tokens
                / n_devices
            )
            found.append(
                Candidate(
                    overrides,
                    mem,
                    analytic_step_seconds(trial, derived, spec),
                    tokens,
                    flops,
                    spec.peak_flops,
                )
            )
    found.sort(
        key=lambda c: (
            round(c.analytic_seconds, 4),
            c.overrides["train.grad_accum_steps"],
            c.overrides["train.loss_chunks"],
            c.analytic_bytes,
        )
    )
    return found


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
            self.log(
                f"plan: {left:.0f} s of budget left, not enough for {kind} "
                f"(~{need:.0f} s); stopping"
            )
            return False
        return True

    def timed(self, kind: str, fn):
        start = time.perf_counter()
        result = fn()
        self.slowest[kind] = max(self.slowest.get(kind, 0.0), time.perf_counter() - start)
        return result


def plan(
    config,
    topology: str,
    num_slices: int = 1,
    budget_s: float = 840,
    max_compiles: int = 3,
    hbm_bytes: float | None = None,
    cache: dict | None = None,
    log=print,
) -> list[Candidate]:
    """Candidates that fit by the analytic estimate, fastest first; then, while `budget_s`
    lasts, (1) the train step of the best `max_compiles` compiled for its real memory, and
    (2) for those that fit, the two small programs that correct XLA's loop count, for a
    compiled step-time estimate. Returns fitting compiled setups first, by step time."""
    topo = parse_topology(topology, num_slices)
    aot.check_config(config, topo)
    devices = topology_devices(topo)
    spec = device_spec(topo, len(devices), hbm_bytes)
    cands = analytic_candidates(config, topo, spec, devices)
    log(
        f"plan: {len(cands)} setups fit by the analytic estimate; compiling the best "
        f"{max_compiles} within {budget_s:.0f} s"
    )
    budget, cache = _Budget(budget_s, log), ({} if cache is None else cache)

    def compile_candidate(cand, correct: bool, kind: str):
        trial = config_lib.with_fields(config, cand.overrides)
        cand.report = budget.timed(
            kind,
            lambda: aot.compile_for(
                trial,
                topo,
                programs=("train_step",),
                hbm_bytes=hbm_bytes,
                cache=cache,
                loop_correction=correct,
            )[0],
        )
        cand.timed = correct

    full, small = "a train step compile", "a step-time estimate (1- and 2-layer programs)"
    for cand in _diverse(cands, max_compiles):
        if not budget.allows(full, 0.0):
            break
        compile_candidate(cand, correct=False, kind=full)
        log(
            f"plan: {_override_text(cand.overrides)}: "
            f"{aot.format_gib(cand.report.total_bytes)} per "
            f"device, {'fits' if cand.fits else 'does not fit'}"
        )
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
    lines = [
        f"{'rank':>4} {'remat':<24} {'accum':>5} {'chunks':>6} {'data/fsdp/tensor':>16} "
        f"{'GiB/device':>10} {'fits':>5} {'step s (est.)':>13} {'tokens/s':>10} "
        f"{'MFU':>6}  memory, time from"
    ]
    shown = [c for c in cands if c.report]
    shown += [c for c in cands if not c.report][: max(0, 12 - len(shown))]
    for i, c in enumerate(shown, 1):
        o, r = c.overrides, c.report
        mesh = f"{o['mesh.data']}/{o['mesh.fsdp']}/{o['mesh.tensor']}"
        memory = r.total_bytes if r else c.analytic_bytes
        fits = ("yes" if c.fits else "NO") if r else "?"
        mfu = c.model_flops / (c.seconds * c.peak_flops)
        timing = (
            f"{c.seconds:>13.3f} {c.tokens_per_step / c.seconds:>10,.0f} {100 * mfu:>5.1f}%"
            if fits != "NO"
            else f"{'-':>13} {'-':>10} {'-':>6}"
        )
        lines.append(
            f"{i:>4} {o['model.remat']:<24} {o['train.grad_accum_steps']:>5} "
            f"{o['train.loss_chunks']:>6} {mesh:>16} {memory / 2**30:>10.2f} "
            f"{fits:>5} {timing}  {'compiled' if r else 'analytic'}, "
            f"{c.time_source if fits != 'NO' else '-'}"
        )
    if len(cands) > len(shown):
        lines.append(f"     ... {len(cands) - len(shown)} more setups fit by the analytic estimate")
    if shown and shown[0].report:
        lines.append(
            f"figures: {shown[0].report.spec_source}; step times are estimates, "
            "analytic ones a lower bound (model FLOPs at peak)"
        )
    best = next((c for c in cands if c.fits), None)
    if best is not None:
        lines.append(
            f"best ({best.time_source} estimate): python -m jaxlm.train "
            f"--config={config_path} {_override_text(best.overrides)}"
        )
        return "\n".join(lines)
    tried = [c for c in cands if c.report]
    if not cands:
        why = "no setup fits even by the analytic memory estimate"
    elif not tried:
        why = "no candidate could be compiled within the budget (raise --plan_budget_s)"
    else:
        least = min(tried, key=lambda c: c.report.total_bytes).report
        why = (
            f"the smallest of the {len(tried)} compiled setups needs "
            f"{aot.format_gib(least.total_bytes)} per device of "
            f"{aot.format_gib(least.hbm_bytes)}"
        )
    lines.append(
        f"NOTHING FITS: {why}; use a bigger slice, a smaller model or a shorter data.seq_len"
    )
    return "\n".join(lines)
