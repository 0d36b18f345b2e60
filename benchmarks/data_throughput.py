"""Tokens/s of `jaxlm.data.prepare` and of the training input pipeline, on this host.

    python -m benchmarks.data_throughput [--config=configs/125m.py] [--batches=50]

1. prepare: the built-in corpus (real text) written as 8 JSONL files, tokenized with a
   tokenizer trained on it, by `--workers` processes: tokens written / wall seconds.
2. pipeline: the config's packed, shuffled, batched rows read back from those ArrayRecord
   shards through grain with the config's threads and prefetch, as training reads them:
   tokens / wall seconds over `--batches` global batches after the first.
3. what the config's model consumes here: a few real train steps (global batch
   `--model_batch` sequences; tokens/s per step barely depend on it) timed after
   `block_until_ready`, and the ceiling peak FLOP/s / FLOPs per token for comparison.
The ratio pipeline / model is what must stay far above 1 (the issue asks >= 20x for
125m). Results are appended to benchmarks/results/data-<machine>.md and .jsonl.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from benchmarks import results_table
from jaxlm import platforms

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/125m.py", "Config whose data shape (seq_len, batch) and model are measured."
)
_BATCHES = flags.DEFINE_integer("batches", 50, "Global batches timed through the pipeline.")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "prepare worker processes.")
_MODEL_STEPS = flags.DEFINE_integer("model_steps", 3, "Timed train steps of the model.")
_MODEL_BATCH = flags.DEFINE_integer("model_batch", 1, "Sequences per timed train step.")
_RESULTS = flags.DEFINE_string("results", "benchmarks/results", "Where rows are appended.")


def write_corpus(directory: pathlib.Path, files: int = 8) -> int:
    from jaxlm.data import corpus

    docs = corpus.builtin_documents("train", 0.05)
    for i in range(files):
        with open(directory / f"part-{i}.jsonl", "w") as f:
            for text in docs[i::files]:
                f.write(json.dumps({"text": text}) + "\n")
    return sum(len(d) for d in docs)


def measure_prepare(work: pathlib.Path, vocab_size: int) -> dict:
    from jaxlm.data import corpus, prepare
    from jaxlm.data import tokenizer as tokenizer_lib

    chars = write_corpus(work)
    tokenizer = work / "tokenizer.model"
    tokenizer_lib.train(corpus.builtin_documents("train", 0.05), vocab_size, tokenizer)
    start = time.perf_counter()
    metadata = prepare.prepare(
        f"{work}/*.jsonl", work / "prepared", tokenizer=tokenizer, workers=_WORKERS.value
    )
    seconds = time.perf_counter() - start
    tokens = sum(s["tokens"] for s in metadata["splits"].values())
    return {
        "prepare_tokens": tokens,
        "prepare_chars": chars,
        "prepare_seconds": seconds,
        "prepare_tokens_per_s": tokens / seconds,
        "prepare_workers": _WORKERS.value,
    }


def measure_pipeline(config, data_dir: pathlib.Path) -> dict:
    from jaxlm.data import pipeline, prepared

    d, batch = config.data, config.train.global_batch_size // config.train.grad_accum_steps
    rows = pipeline.PackedRows(
        prepared.PreparedDataset(data_dir).documents("train"), d.seq_len, config.seed
    )
    batches = pipeline.train_batches(rows, batch, config)
    next(batches)  # threads started, first rows read
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
        next(batches)
    seconds = time.perf_counter() - start
    tokens = _BATCHES.value * batch * d.seq_len
    return {
        "pipeline_batch": batch,
        "seq_len": d.seq_len,
        "pipeline_batches": _BATCHES.value,
        "pipeline_seconds": seconds,
        "pipeline_tokens_per_s": tokens / seconds,
        "epoch_rows": len(rows),
        "num_threads": d.num_threads,
        "prefetch": d.prefetch,
    }


def measure_model(config) -> dict:
    """Real train steps of the config's model, timed after block_until_ready."""
    import jax

    from benchmarks import synthetic
    from jaxlm import metrics as metrics_lib
    from jaxlm import sharding as sharding_lib
    from jaxlm import step as step_lib

    if jax.default_backend() == "cpu":
        config.model.dtype = "float32"  # CPUs have no fast bf16 matmul; f32 is faster here
    config.train.global_batch_size, config.train.grad_accum_steps = _MODEL_BATCH.value, 1
    factory, derived = step_lib.build(config)
    train_step = step_lib.make_train_step(factory)
    state = factory.create(jax.random.key(0))
    batch = sharding_lib.global_batch(
        synthetic.token_batch(_MODEL_BATCH.value, config.data.seq_len, config.model.vocab_size),
        factory.batch_sharding,
    )
    times = []
    with factory.context():
        for i in range(_MODEL_STEPS.value + 1):  # the first compiles
            start = time.perf_counter()
            state, metrics = train_step(state, batch)
            jax.block_until_ready((state, metrics))
            if i:
                times.append(time.perf_counter() - start)
    tokens = _MODEL_BATCH.value * config.data.seq_len
    peak, peak_source = metrics_lib.peak_flops_total(jax.devices())
    flops = metrics_lib.flops_per_token(config.model, derived.head_dim, config.data.seq_len)
    return {
        "model_tokens_per_s": tokens / statistics.median(times),
        "model_ceiling_tokens_per_s": peak / flops,
        "peak_flops": peak,
        "peak_source": peak_source,
        "model_dtype": config.model.dtype,
        "model_params": derived.n_params,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }


def record(row: dict) -> pathlib.Path:
    return results_table.record(
        pathlib.Path(_RESULTS.value) / f"data-{row['machine']}",
        [row],
        f"# Data throughput on {row['machine']}\n\n`python -m benchmarks.data_throughput`; "
        "see its docstring for what each column measures.",
        [
            "date",
            "config",
            "prepare tok/s (workers)",
            "pipeline tok/s (batch x seq, threads)",
            "model tok/s (ceiling)",
            "pipeline / model",
        ],
        [
            [
                row["date"],
                row["config"],
                f"{row['prepare_tokens_per_s']:,.0f} ({row['prepare_workers']})",
                f"{row['pipeline_tokens_per_s']:,.0f} ({row['pipeline_batch']} x {row['seq_len']}, "
                f"{row['num_threads']})",
                f"{row['model_tokens_per_s']:,.0f} ({row['model_ceiling_tokens_per_s']:,.0f})",
                f"{row['ratio']:,.0f}x",
            ]
        ],
    )


def main(argv):
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    del argv
    config = _CONFIG.value
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        row = {
            "machine": results_table.cpu()[2],
            "date": time.strftime("%Y-%m-%d"),
            "config": flags.FLAGS["config"].config_filename,
        }
        row.update(measure_prepare(work, min(config.model.vocab_size, 8000)))
        print(
            f"prepare: {row['prepare_tokens']:,} tokens in {row['prepare_seconds']:.1f} s = "
            f"{row['prepare_tokens_per_s']:,.0f} tokens/s ({row['prepare_workers']} workers)"
        )
        row.update(measure_pipeline(config, work / "prepared"))
    print(
        f"pipeline: {row['pipeline_batches']} batches of {row['pipeline_batch']} x "
        f"{row['seq_len']} in {row['pipeline_seconds']:.2f} s = "
        f"{row['pipeline_tokens_per_s']:,.0f} tokens/s"
    )
    row.update(measure_model(config))
    row["ratio"] = row["pipeline_tokens_per_s"] / row["model_tokens_per_s"]
    print(
        f"model ({row['model_params'] / 1e6:.0f}M params, {row['model_dtype']}, "
        f"{row['devices']}): {row['model_tokens_per_s']:,.0f} tokens/s measured, "
        f"{row['model_ceiling_tokens_per_s']:,.0f} at peak ({row['peak_source']})"
    )
    print(
        f"pipeline / model = {row['ratio']:,.0f}x (pipeline / ceiling = "
        f"{row['pipeline_tokens_per_s'] / row['model_ceiling_tokens_per_s']:,.0f}x)"
    )
    print(f"recorded in {record(row)}")


if __name__ == "__main__":
    from jaxlm import cli

    app.run(main, flags_parser=cli.parse_flags)
