"""Model FLOPs, MFU against the device peak, and where metrics go (JSONL, TensorBoard)."""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxlm import files, goodput, noise_scale, param_layout

# Dense bf16 peak FLOP/s per device, from vendor spec sheets (docs/DESIGN.md). Matched by
# substring against jax.Device.device_kind, most specific first.
PEAK_FLOPS = (
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p chips report device_kind "TPU v5"
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


# Per-chip TPU memory and bandwidths, from Google's published spec (cloud.google.com/tpu/docs,
# each generation's "system architecture" page): HBM capacity, HBM bandwidth, and the chip's
# inter-chip interconnect (ICI) bandwidth, in bytes and bytes/s. Peaks stay in PEAK_FLOPS.
# jaxlm.aot sizes a slice with them: HBM for "does it fit", bandwidths for its roofline.
TPU_CHIP_SPECS = {
    "v4": {"hbm_bytes": 32 * 2**30, "hbm_bytes_per_s": 1228e9, "ici_bytes_per_s": 300e9},
    "v5e": {"hbm_bytes": 16 * 2**30, "hbm_bytes_per_s": 819e9, "ici_bytes_per_s": 200e9},
    "v5p": {"hbm_bytes": 95 * 2**30, "hbm_bytes_per_s": 2765e9, "ici_bytes_per_s": 600e9},
    "v6e": {"hbm_bytes": 32 * 2**30, "hbm_bytes_per_s": 1640e9, "ici_bytes_per_s": 448e9},
}


def flops_per_token(
    m,
    head_dim: int,
    seq_len: int,
    causal: bool = True,
    lora_rank: int = 0,
    lora_targets: tuple = (),
) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), docs/DESIGN.md's formula.

    6 * (block matmul params) + 6 * d_model * vocab (LM head) + attention scores and
    values: 6 * n_layers * seq_len * d_attn with causal masking (half the square), or
    12 * ... counting the full square as some peers do. Embedding lookups count zero.

    With LoRA (lora_rank > 0) the base weights get no gradient: their matmuls cost 4x their
    params (forward, and the input's gradient), and each adapted kernel [in, out] adds
    6 * rank * (in + out) for A [in, rank] and B [rank, out].
    """
    d_attn = m.n_heads * head_dim
    sizes = param_layout.matmul_sizes(
        {
            "d_model": m.d_model,
            "n_heads": m.n_heads,
            "n_kv_heads": m.n_kv_heads,
            "head_dim": head_dim,
            "d_ff": m.d_ff,
        }
    )  # (fan in, fan out) of each kernel
    block_matmuls = m.n_layers * sum(a * b for a, b in sizes.values())
    attention = 6 * m.n_layers * seq_len * d_attn * (1 if causal else 2)
    weights = 4 if lora_rank else 6
    adapters = 6 * m.n_layers * lora_rank * sum(sum(sizes[t]) for t in lora_targets)
    return weights * (block_matmuls + m.d_model * m.vocab_size) + attention + adapters


# Benchmarks take the best of more matmuls than a training run's quick estimate: single
# 2048^3 calls range 100-160 GFLOP/s within one process on the 2-core VM
# (benchmarks/results/NOTES.md).
BENCHMARK_CPU_PEAK_REPEATS = 20


def measure_cpu_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a jitted float32 size^3 matmul on the first device (CPU peak)."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_total(devices, cpu_repeats: int = 5) -> tuple[float, str]:
    """Peak FLOP/s of all `devices` together, and where the number came from.

    CPU devices (real or simulated) share the host's cores, so the CPU peak is one
    measured matmul rate for the whole host, not one per simulated device. Single calls
    vary by +-20% on a shared VM: benchmarks take the best of more repeats.
    """
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return (
            measure_cpu_peak(repeats=cpu_repeats),
            f"measured: best of {cpu_repeats} jitted f32 2048^3 matmuls on this host",
        )
    for name, peak in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return peak * len(
                devices
            ), f"spec sheet: {peak / 1e12:.0f} TFLOP/s x {len(devices)} {kind}"
    return float("nan"), f"unknown device kind {kind!r}: no peak in jaxlm.metrics.PEAK_FLOPS"


def mfu(flops_per_tok: float, tokens_per_second: float, peak_total: float) -> float:
    return flops_per_tok * tokens_per_second / peak_total


def throughput(
    step_seconds: list[float],
    tokens_per_step: int,
    flops_causal: float,
    flops_full_square: float,
    peak_total: float,
    n_devices: int,
) -> dict:
    """What a benchmark reports from its measured step times: the median step sets the rate."""
    median = statistics.median(step_seconds)
    tokens_per_second = tokens_per_step / median
    return {
        "step_ms_median": 1e3 * median,
        "step_ms_min": 1e3 * min(step_seconds),
        "step_ms_max": 1e3 * max(step_seconds),
        "steps": len(step_seconds),
        "tokens_per_second": tokens_per_second,
        "tokens_per_second_per_device": tokens_per_second / n_devices,
        "tflops_per_device": flops_causal * tokens_per_second / n_devices / 1e12,
        "mfu_causal": mfu(flops_causal, tokens_per_second, peak_total),
        "mfu_full_square": mfu(flops_full_square, tokens_per_second, peak_total),
    }


class Throughput:
    """Tokens per second and MFU of the steps since the last logged row. Timed from the end of
    this process's first step (which compiles); a step that compiles again (the first of each
    later seq_len stage) and evaluations are left out. The caller syncs the device (blocks on
    the state) before `pause` and `resume`, so the host's clock measures the device's work."""

    def __init__(self, peak_total: float):
        self.peak = peak_total
        self.start, self.tokens, self.flops = None, 0, 0.0
        self._untimed_from = 0.0

    @property
    def started(self) -> bool:
        return self.start is not None

    def pause(self) -> None:
        """What follows until `resume` is not training time (a step that compiles)."""
        self._untimed_from = time.perf_counter()

    def resume(self) -> None:
        """After a compiling step: the first starts the clock, a later one is left out."""
        if self.start is None:
            self.start = time.perf_counter()
        else:
            self.start += time.perf_counter() - self._untimed_from

    def add(self, tokens_per_call: int, calls: int, flops_per_token: float) -> None:
        self.tokens += tokens_per_call * calls
        self.flops += flops_per_token * tokens_per_call * calls

    def leave_out_since(self, since: float) -> None:
        """The time from perf_counter() value `since` to now was not training (evaluation)."""
        self.start += time.perf_counter() - since

    def rates(self) -> dict:
        """{"tokens_per_second", "mfu"} of the timed steps, {} when none was timed."""
        if not self.tokens:
            return {}
        tokens_per_second = self.tokens / (time.perf_counter() - self.start)
        return {
            "tokens_per_second": tokens_per_second,
            "mfu": mfu(self.flops / self.tokens, tokens_per_second, self.peak),
        }

    def restart(self) -> None:
        """A row was logged: the next one times the steps from here on."""
        self.start, self.tokens, self.flops = time.perf_counter(), 0, 0.0


# Fields of a metrics row that time the run (throughput, and jaxlm.goodput's): they differ
# between any two runs. Every other field (loss, lr, grad_norm, skipped_microbatches,
# val_loss, seq_len, rows_per_step) is a function of the config and the data alone, the
# same bit for bit in a resumed run.
WALL_CLOCK_FIELDS = ("tokens_per_second", "mfu", *goodput.METRIC_FIELDS)


class LogWindow:
    """What a logged row sums over: the finite microbatches' loss sums and target counts since
    the last row (its loss is their token-weighted mean, as one batch of all their rows would
    give), the non-finite microbatches skipped so far (and in a row), and the smoothed gradient
    noise scale (jaxlm.noise_scale). Saved with each
    checkpoint, so a run resumed between two rows logs the row the unbroken run logs, whatever
    log_every is. Kept as Python floats (exact in JSON) and summed in float64."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        # A checkpoint from before the sums were kept holds per-microbatch mean losses: each
        # counts as one target, as their plain mean did.
        old = [float(x) for x in state.get("losses", ())]
        self.loss_sums = [float(x) for x in state.get("loss_sums", old)]
        self.target_counts = [float(x) for x in state.get("target_counts", [1.0] * len(old))]
        self.skipped_total = int(state.get("skipped_total", 0))
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        # Not reset by a logged row: an average over updates, resumed with the window.
        self.noise_scale = noise_scale.NoiseScale(state.get("noise_scale"))

    def add(self, loss_sum, target_count) -> None:
        if np.isfinite(loss_sum):
            self.loss_sums.append(float(loss_sum))
            self.target_counts.append(float(target_count))

    def mean_loss(self) -> float:
        count = np.sum(np.asarray(self.target_counts, np.float64))
        if not count:
            return float("nan")
        return float(np.sum(np.asarray(self.loss_sums, np.float64)) / count)

    def reset(self) -> None:
        """A row was logged: the next one averages the losses from here on."""
        self.loss_sums, self.target_counts = [], []

    def state(self) -> dict:
        return {
            "loss_sums": list(self.loss_sums),
            "target_counts": list(self.target_counts),
            "skipped_total": self.skipped_total,
            "skipped_in_a_row": self.skipped_in_a_row,
            "noise_scale": self.noise_scale.state(),
        }


class Writer:
    """Scalars to `metrics.jsonl` and TensorBoard event files in the workdir (process 0).

    `first_step` (the first step this run will log) marks the new event file so that
    TensorBoard hides what earlier files logged from that step on: the steps a killed run
    logged after its last checkpoint are not shown twice (`metrics.jsonl` is trimmed by
    the train loop instead).

    metrics.jsonl goes through etils.epath (`jaxlm.files`), so a gs:// workdir takes it;
    tensorboardX writes gs:// event files through its own Google Cloud Storage client
    (`pip install google-cloud-storage`), uploading the whole file at each flush.
    """

    FILENAME = "metrics.jsonl"

    def __init__(
        self,
        workdir: epath.PathLike,
        enabled: bool = True,
        first_step: int | None = None,
        sinks: tuple = (),
    ):
        self.enabled, self.sinks = enabled, sinks  # sinks: more .write(step, row)s (W&B)
        workdir = files.path(workdir)
        self.path = workdir / self.FILENAME
        self._tb, self._tb_dir, self._tb_files = None, os.fspath(workdir / "tensorboard"), 0
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = self.path.open("a")
            self._open_tensorboard(purge_step=first_step)

    def _open_tensorboard(self, purge_step: int | None) -> None:
        """A new event file; its numbered suffix keeps this process's files in name order
        (the order TensorBoard reads them in) when two open within one second."""
        from tensorboardX import SummaryWriter  # heavy import, only where used

        self._tb_files += 1
        self._tb = SummaryWriter(
            self._tb_dir,
            purge_step=purge_step,
            filename_suffix=f".{os.getpid()}.{self._tb_files:06d}",
        )

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()  # a row at a time, as `tail -f` and a kill would want
        for name, value in row.items():
            if name != "step":
                self._tb.add_scalar(name, value, int(step))
        for sink in self.sinks:
            sink.write(int(step), row)

    def flush(self) -> None:
        """Put every row written so far into the files: called as a checkpoint is saved, so
        a run killed after it loses no row at or before the checkpoint's step.

        tensorboardX's flush() writes only what its background thread has already taken
        off its queue; close() drains the queue. So the event file is closed and the next
        rows go to a new one: one event file per checkpoint, which TensorBoard reads as one.
        """
        if self.enabled:
            self._jsonl.flush()
            self._tb.close()
            self._open_tensorboard(purge_step=None)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def readable_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}"
        n /= 1024


def memory_per_device(factory) -> str:
    """What each device holds of the params and the optimizer state (its largest shards)."""

    def size(tree):
        return sum(
            np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
            for a in jax.tree.leaves(tree)
        )

    abstract = factory.abstract
    params = f"params {readable_bytes(size(abstract['params']))}"
    if factory.lora:
        adapters = readable_bytes(size(factory.trained(abstract)["params"]))
        params += f" (LoRA adapters {adapters}, the rest frozen)"
    optimizer = readable_bytes(size(abstract["opt_state"]))
    return f"memory per device: {params}, optimizer state {optimizer}"


def keep_rows_before(path: epath.Path, first_step: int) -> None:
    """Drop the rows at or after `first_step`, which this run logs again (a killed run's rows
    past its checkpoint; all of them when starting afresh), and any line torn by the kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) < first_step:
            kept.append(line)
    files.write_atomically(path, "".join(line + "\n" for line in kept))


def last_value(workdir: epath.PathLike, name: str) -> tuple[float, int] | None:
    """(value, step) of the last row of `workdir`'s metrics.jsonl that holds `name`, or None:
    how a sweep reads a trial's result. A line torn by a kill is skipped."""
    path = files.path(workdir) / Writer.FILENAME
    found = None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name in row:
                found = (float(row[name]), int(row["step"]))
    return found
