"""SFT vs pre-training throughput of the same model, and how much of each batch is trained.

    python -m benchmarks.sft_throughput [--config=configs/tiny.py] [--steps=6] [--rounds=2]

Both runs use the config's model, batch and seq_len, real data read through the training
pipeline (pipeline.train_batches, as jaxlm.train reads it) and the real jitted train step:
- pre-training: the built-in corpus (the stdlib's .py files) packed by PackedRows;
- SFT: the built-in instruction set (`sft:builtin`: a stdlib function's signature and
  docstring -> its body, `plain` template), prepared with `prepare --sft` and packed whole
  per row by PackedConversations (data.sft_overflow = "drop").
One tokenizer (trained on the corpus, the config's vocab_size) serves both. Each round times
`--steps` steps of each after one untimed step (compile), pre-training and SFT alternating
(the host is shared), and the medians over rounds are reported:
- positions/s = batch x seq_len / step seconds (the step's work, padding included);
- real tokens/s = positions/s x (1 - padding fraction);
- trained tokens/s = positions whose target the loss counts (loss_mask), per second.
Padding fraction = input positions with no token; masked-token fraction = positions the loss
counts over all positions. Rows go to benchmarks/results/sft-<machine>.{jsonl,md}.
"""

from __future__ import annotations

import pathlib
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import results_table
from jaxlm import platforms

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Model, batch, seq_len.")
_STEPS = flags.DEFINE_integer("steps", 6, "Timed train steps per round and kind.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds of (pre-training, SFT).")
_NOTE = flags.DEFINE_string("note", "", "Said about the machine in the results row.")
_RESULTS = flags.DEFINE_string("results", "benchmarks/results", "Where rows are appended.")


def _rows(config, work: pathlib.Path):
    """(pre-training rows, SFT rows) over one tokenizer trained on the built-in corpus."""
    from jaxlm.data import corpus, pipeline, prepare, prepared
    from jaxlm.data import tokenizer as tokenizer_lib
    from jaxlm.data.documents import InMemoryDocuments

    docs = corpus.builtin_documents("train", config.data.val_fraction)
    tokenizer = work / "tokenizer.model"
    sp = tokenizer_lib.train(docs, config.model.vocab_size, tokenizer, seed=config.seed)
    text_rows = pipeline.PackedRows(
        InMemoryDocuments(pipeline.tokenize(sp, docs)), config.data.seq_len, config.seed
    )
    config.data.source = "sft:builtin"
    source = pipeline.write_builtin_instructions(work)
    prepare.prepare(
        source,
        work / "sft",
        tokenizer=tokenizer,
        sft=True,
        chat_template="plain",
        val_fraction=0.0,
        workers=1,
    )
    sft_docs = prepared.PreparedDataset(work / "sft").documents("train")
    return text_rows, pipeline.rows_for(sft_docs, config)


def _masked_fraction(rows, n: int = 200) -> float:
    picks = np.random.default_rng(0).choice(len(rows), min(n, len(rows)), replace=False)
    return float(np.mean([rows[int(i)]["loss_mask"].mean() for i in picks]))


def main(argv):
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    del argv
    from jaxlm import sharding as sharding_lib
    from jaxlm import step as step_lib
    from jaxlm.data import pipeline

    config = _CONFIG.value
    factory, derived = step_lib.build(config)
    train_step = step_lib.make_train_step(factory)
    with tempfile.TemporaryDirectory() as tmp:
        kinds = dict(zip(("pretrain", "sft"), _rows(config, pathlib.Path(tmp))))
        batches = {
            k: pipeline.train_batches(rows, derived.micro_batch_size, config)
            for k, rows in kinds.items()
        }
        state = factory.create(jax.random.key(0))
        seconds = {k: [] for k in kinds}
        trained = {k: [] for k in kinds}
        with factory.context():
            for k in kinds:  # compile (the same program for both) and warm the readers
                state, _ = train_step(
                    state, sharding_lib.global_batch(next(batches[k]), factory.batch_sharding)
                )
            jax.block_until_ready(state)
            for _ in range(_ROUNDS.value):
                for k in kinds:
                    counted, start = 0.0, time.perf_counter()
                    for _ in range(_STEPS.value):
                        batch = next(batches[k])
                        counted += float(batch["loss_mask"].sum())
                        state, _ = train_step(
                            state, sharding_lib.global_batch(batch, factory.batch_sharding)
                        )
                    jax.block_until_ready(state)
                    seconds[k].append((time.perf_counter() - start) / _STEPS.value)
                    trained[k].append(counted / _STEPS.value)
        model, cores, machine = results_table.cpu()
        positions = derived.micro_batch_size * config.data.seq_len
        row = {
            "machine": machine,
            "cpu": model,
            "cores": cores,
            "note": _NOTE.value,
            "date": time.strftime("%Y-%m-%d"),
            "config": flags.FLAGS["config"].config_filename,
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "batch": derived.micro_batch_size,
            "seq_len": config.data.seq_len,
            "steps": _STEPS.value,
            "rounds": _ROUNDS.value,
        }
        for k, rows in kinds.items():
            step_s = statistics.median(seconds[k])
            padding = rows.padding_fraction
            row[k] = {
                "step_s": step_s,
                "positions_per_s": positions / step_s,
                "real_tokens_per_s": positions * (1 - padding) / step_s,
                "trained_tokens_per_s": statistics.median(trained[k]) / step_s,
                "padding_fraction": padding,
                "masked_fraction": _masked_fraction(rows),
                "rows": len(rows),
            }
            print(
                f"{k:8s}: {row[k]['positions_per_s']:,.0f} positions/s "
                f"({step_s:.3f} s/step), {row[k]['real_tokens_per_s']:,.0f} real tokens/s, "
                f"{row[k]['trained_tokens_per_s']:,.0f} trained tokens/s; padding "
                f"{100 * padding:.2f}%, masked-token fraction "
                f"{100 * row[k]['masked_fraction']:.1f}%"
                f" ({len(rows):,} rows)"
            )
        sft, pre = row["sft"], row["pretrain"]
        print(
            f"SFT / pre-training: positions/s "
            f"{sft['positions_per_s'] / pre['positions_per_s']:.2f}x, trained tokens/s "
            f"{sft['trained_tokens_per_s'] / pre['trained_tokens_per_s']:.2f}x"
        )
        print(f"recorded in {record(row)}")


def _cell(kind: dict) -> str:
    return (
        f"{kind['positions_per_s']:,.0f} ({100 * kind['padding_fraction']:.2f}%, "
        f"{100 * kind['masked_fraction']:.1f}%)"
    )


def record(row: dict) -> pathlib.Path:
    p, s = row["pretrain"], row["sft"]
    return results_table.record(
        pathlib.Path(_RESULTS.value) / f"sft-{row['machine']}",
        [row],
        f"# SFT vs pre-training throughput on {row['machine']}\n\n`python -m "
        "benchmarks.sft_throughput`; see its docstring for what each column measures "
        "(positions/s counts padding; trained = positions the loss mask counts).",
        [
            "date",
            "config (batch x seq)",
            "machine",
            "pre-train positions/s (padding, trained %)",
            "SFT positions/s (padding, trained %)",
            "SFT trained tok/s / pre-train trained tok/s",
        ],
        [
            [
                row["date"],
                f"{row['config']} ({row['batch']} x {row['seq_len']})",
                f"{row['cpu']}, {row['cores']} cores{'; ' + row['note'] if row['note'] else ''}",
                _cell(p),
                _cell(s),
                f"{s['trained_tokens_per_s'] / p['trained_tokens_per_s']:.2f}",
            ]
        ],
    )


if __name__ == "__main__":
    from jaxlm import cli

    app.run(main, flags_parser=cli.parse_flags)
