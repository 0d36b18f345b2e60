"""Measure training throughput and MFU of a config on the devices present.

    python -m benchmarks.mfu --config=configs/1b.py --steps=20 --warmup=3 \
        --config.train.global_batch_size=16

Runs real jitted train steps (optimizer included) on synthetic tokens, one document per
row, or with `--data` on the config's data source (packed rows through the grain pipeline,
so host input time counts), timing each step after `block_until_ready`. MFU = model FLOPs
per token (docs/DESIGN.md: 6 * block matmul params + 6 * d_model * vocab + causal attention)
* tokens/s / peak FLOP/s of all devices; the full-square attention count is printed beside
it. A row is appended to benchmarks/results/<device kind>.md, and the same as JSON to
<device kind>.jsonl.
"""

from __future__ import annotations

import os
import pathlib
import platform
import re
import resource
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import results_table, synthetic
from jaxlm import cli, platforms, profiling
from jaxlm import metrics as metrics_lib
from jaxlm import sharding as sharding_lib
from jaxlm import step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/1b.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Measured optimizer steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Unmeasured steps after compilation.")
_RESULTS = flags.DEFINE_string("results", "benchmarks/results", "Where rows are appended.")
_NOTE = flags.DEFINE_string("note", "", "Free text recorded with the row.")
_DATA = flags.DEFINE_bool("data", False, "Feed config.data's source instead of synthetic tokens.")
_WORKDIR = flags.DEFINE_string(
    "workdir",
    "/tmp/jaxlm-mfu",
    "With --data: where the tokenizer and prepared data are cached; with --profile: the trace.",
)
_PROFILE = flags.DEFINE_bool(
    "profile",
    False,
    "Trace the measured steps (not compile or warmup) to WORKDIR/profile/<first step>/, as "
    "train.profile_steps does.",
)


def batch_source(config, derived, factory):
    """A function giving the next global batch: the same synthetic one, or the data pipeline's."""
    seq_len, vocab = config.data.seq_len, config.model.vocab_size
    if not _DATA.value:
        batch = sharding_lib.global_batch(
            synthetic.token_batch(derived.micro_batch_size, seq_len, vocab), factory.batch_sharding
        )
        return lambda: batch, "synthetic tokens, one document per row"
    from jaxlm.data import pipeline  # grain and sentencepiece only when asked for

    data = pipeline.build(config, _WORKDIR.value)
    batches = pipeline.train_batches(data.train_rows, derived.micro_batch_size, config)
    padding = 100 * data.train_rows.padding_fraction
    return (
        lambda: sharding_lib.global_batch(next(batches), factory.batch_sharding),
        f"{config.data.source}, packed rows ({padding:.1f}% padding)",
    )


def peak_memory_bytes() -> tuple[int, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], "device peak_bytes_in_use (device 0)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def record(results_dir: str, row: dict) -> pathlib.Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", row["device_kind"]).strip("-").lower()
    if slug == "cpu":  # name the machine: CPU rows from different hosts don't compare
        slug = f"cpu-{results_table.cpu()[2]}"
    columns = [
        "date",
        "config",
        "params",
        "devices",
        "mesh",
        "batch x seq",
        "dtype",
        "remat",
        "attention",
        "compile s",
        "step ms (median/min/max)",
        "tokens/s/device",
        "TFLOP/s/device",
        "MFU causal",
        "MFU full-square",
        "peak mem GiB",
        "jax",
        "note",
    ]
    cells = [
        row["date"],
        row["config"],
        f"{row['params'] / 1e9:.3f}B",
        f"{row['device_count']}x {row['device_kind']}",
        row["mesh"],
        f"{row['global_batch_size']} x {row['seq_len']}",
        row["dtype"],
        row["remat"],
        row["attention"],
        f"{row['compile_seconds']:.1f}",
        f"{row['step_ms_median']:.1f} / {row['step_ms_min']:.1f} / {row['step_ms_max']:.1f}",
        f"{row['tokens_per_second_per_device']:,.0f}",
        f"{row['tflops_per_device']:.1f}",
        f"{100 * row['mfu_causal']:.1f}%",
        f"{100 * row['mfu_full_square']:.1f}%",
        f"{row['peak_memory_bytes'] / 2**30:.1f}",
        row["jax_version"],
        row["note"],
    ]
    return results_table.record(
        pathlib.Path(results_dir) / slug,
        [row],
        f"# {row['device_kind']}\n\nRows appended by `python -m benchmarks.mfu`; "
        "MFU uses DESIGN.md's FLOPs formula.",
        columns,
        [cells],
    )


def main(argv):
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    del argv
    config = _CONFIG.value
    devices = jax.devices()
    factory, derived = step_lib.build(config, devices)
    t, m, seq_len = config.train, config.model, config.data.seq_len

    # On CPU the peak is measured: before the steps and again after them, keeping the
    # better reading, so a slow moment of the host cannot flatter the MFU.
    def measure_peak():
        return metrics_lib.peak_flops_total(devices, metrics_lib.BENCHMARK_CPU_PEAK_REPEATS)

    peak_before, _ = measure_peak()
    state = factory.create(jax.random.key(config.seed))
    next_batch, data_description = batch_source(config, derived, factory)
    batch = next_batch()

    with factory.context():
        start = time.perf_counter()
        train_step = step_lib.make_train_step(factory).lower(state, batch).compile()
        compile_seconds = time.perf_counter() - start

    def optimizer_step(state):
        for _ in range(t.grad_accum_steps):
            # The window's target count only scales the gradient: any positive one times the
            # same step.
            state, metrics = train_step(
                state,
                next_batch(),
                np.float32(t.global_batch_size),
                np.float32(t.grad_accum_steps),
            )
        return jax.block_until_ready((state, metrics))

    for _ in range(_WARMUP.value):
        state, metrics = optimizer_step(state)
    times = []
    trace = profiling.trace_dir(pathlib.Path(_WORKDIR.value) / "profile", _WARMUP.value + 1)
    if _PROFILE.value:
        jax.profiler.start_trace(trace)
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        state, metrics = optimizer_step(state)
        times.append(time.perf_counter() - start)
    if _PROFILE.value:
        jax.profiler.stop_trace()
        print(f"profile      {trace} (README: Profiles)")
    if not np.isfinite(float(metrics["loss"])):
        raise SystemExit(f"loss is {float(metrics['loss'])}: the measured steps are not valid")

    peak_after, peak_source = measure_peak()
    peak = max(peak_before, peak_after)
    if peak_before != peak_after:
        peak_source += (
            f", the better of {peak_before / 1e9:.1f} before and "
            f"{peak_after / 1e9:.1f} GFLOP/s after the steps"
        )
    causal = metrics_lib.flops_per_token(m, derived.head_dim, seq_len, causal=True)
    full = metrics_lib.flops_per_token(m, derived.head_dim, seq_len, causal=False)
    summary = metrics_lib.throughput(
        times, t.global_batch_size * seq_len, causal, full, peak, len(devices)
    )
    memory, memory_source = peak_memory_bytes()
    attention = factory.model.cfg.attention.impl  # what "auto" became on these devices
    if m.attention == "auto":
        attention = f"auto: {attention}"
    row = {
        "date": time.strftime("%Y-%m-%d"),
        "config": flags.FLAGS["config"].config_filename,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "host": f"{platform.machine()} {os.cpu_count()} cores",
        "mesh": str(derived.mesh_shape),
        "params": derived.n_params,
        "flops_per_token_causal": causal,
        "flops_per_token_full_square": full,
        "global_batch_size": t.global_batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "seq_len": seq_len,
        "dtype": m.dtype,
        "remat": m.remat,
        "attention": attention,
        "data": data_description,
        "compile_seconds": compile_seconds,
        **summary,
        "peak_flops_total": peak,
        "peak_flops_before_after": [peak_before, peak_after],
        "peak_source": peak_source,
        "peak_memory_bytes": memory,
        "memory_source": memory_source,
        "jax_version": jax.__version__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "note": f"data: {data_description}. {_NOTE.value}" if _DATA.value else _NOTE.value,
    }
    if row["glibc_tunables"]:  # changes CPU step times by ~10% (README, Benchmarks)
        row["note"] = f"GLIBC_TUNABLES={row['glibc_tunables']}; {row['note']}".rstrip("; ")
    print(
        f"devices      {len(devices)} x {row['device_kind']} ({row['host']}), mesh {row['mesh']}"
        f", GLIBC_TUNABLES={row['glibc_tunables']!r}"
    )
    print(
        f"model        {derived.n_params / 1e9:.3f}B params, {m.dtype}, remat {m.remat}, "
        f"attention {attention}"
    )
    print(
        f"batch        {t.global_batch_size} x {seq_len} tokens ({t.grad_accum_steps} microbatches)"
        f", {data_description}"
    )
    print(
        f"FLOPs/token  {causal / 1e9:.3f} GFLOP causal, {full / 1e9:.3f} GFLOP full-square "
        "(6*N_matmul + 6*d_model*vocab + 6*n_layers*seq*d_attn [x2 full-square])"
    )
    print(f"compile      {compile_seconds:.1f} s")
    print(
        f"step time    median {row['step_ms_median']:.1f} ms, min {row['step_ms_min']:.1f}, "
        f"max {row['step_ms_max']:.1f} over {len(times)} steps (after {_WARMUP.value} warmup)"
    )
    per_device = row["tokens_per_second_per_device"]
    print(
        f"throughput   {row['tokens_per_second']:,.0f} tokens/s, {per_device:,.0f} per device, "
        f"{row['tflops_per_device']:.1f} model TFLOP/s per device"
    )
    print(
        f"MFU          {100 * row['mfu_causal']:.1f}% causal, {100 * row['mfu_full_square']:.1f}% "
        f"full-square; peak {peak / 1e12:.3g} TFLOP/s ({peak_source})"
    )
    print(f"memory       {memory / 2**30:.2f} GiB ({memory_source})")
    print(f"recorded     {record(_RESULTS.value, row)}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
