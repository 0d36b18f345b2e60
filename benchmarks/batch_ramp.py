"""The same model on the same token budget with a fixed small batch, a fixed large batch, a
token-threshold batch schedule and the adaptive ramp: final validation loss, optimizer steps
and wall time per arm, and a plot of loss against tokens and of the gradient noise scale.

    python -m benchmarks.batch_ramp --total_tokens=300000

Every arm is a `train.batch_schedule` (a fixed batch is a one-stage schedule), so all three
run their learning rate in tokens (warmup, then cosine to total_tokens) and accumulate
microbatches of the same rows (so each logs the gradient noise scale). The adaptive arm starts
at the small batch and doubles up to the large one where the noise scale passes the batch
(train.adaptive_batch_ratio 1). Rows go to
benchmarks/results/batch-ramp-<cpu>.md / .jsonl, the plot beside them (matplotlib).
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import app, flags

from benchmarks import results_table
from configs import tiny
from jaxlm import batch_schedule, platforms
from jaxlm import train as train_lib

_TOTAL = flags.DEFINE_integer("total_tokens", 300_000, "Tokens every arm trains on.")
_ROOT = flags.DEFINE_string("root", "/tmp/jaxlm-batch-ramp", "The arms' runs go under here.")
_RESULTS = flags.DEFINE_string("results", "benchmarks/results", "Where rows are appended.")
_NOTE = flags.DEFINE_string("note", "", "Free text recorded with the rows.")

SEQ_LEN, MICRO = 64, 4  # rows of 64 tokens, microbatches of 4 rows
SMALL, LARGE = 8, 32  # the fixed arms' batches, where the ramps start and end


def arms(total: int) -> dict:
    """name -> train.batch_schedule."""
    return {
        "fixed small (8)": ((0, 8),),
        "fixed large (32)": ((0, 32),),
        "schedule 8 -> 16 -> 32": ((0, 8), (total // 8, 16), (total // 3, 32)),
        "adaptive 8 -> 32": batch_schedule.ADAPTIVE,
    }


def arm_config(schedule, total: int, workdir: pathlib.Path):
    config = tiny.get_config()
    m, t = config.model, config.train
    m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.d_ff = 2, 128, 4, 2, 384
    config.data.seq_len, config.data.eval_batches = SEQ_LEN, 8
    config.data.tokenizer = str(workdir / "tokenizer.model")
    first = SMALL if schedule == batch_schedule.ADAPTIVE else schedule[0][1]
    t.global_batch_size, t.grad_accum_steps = first, first // MICRO
    t.batch_schedule, t.total_tokens, t.warmup_tokens = schedule, total, total // 20
    if schedule == batch_schedule.ADAPTIVE:
        t.max_global_batch_size = LARGE
    t.batch_lr_scaling = "sqrt"
    t.log_every, t.eval_every = 2, 10**9  # validation at the start and the end only
    config.checkpoint.every = 10**9
    config.mesh.fsdp = 1  # one CPU device
    return config


def tokens_by_step(logged: list[dict], first_batch: int) -> dict[int, int]:
    """Tokens consumed by the end of each update, from the run's metrics rows (a stage's
    first update logs its batch), so the adaptive arm's decisions count too."""
    starts = {int(r["step"]): int(r["global_batch_size"]) for r in logged if "batch_stage" in r}
    last = max(int(r["step"]) for r in logged)
    tokens, batch, out = 0, first_batch, {}
    for step in range(1, last + 1):
        batch = starts.get(step, batch)
        tokens += batch * SEQ_LEN
        out[step] = tokens
    return out


def main(argv):
    del argv
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    total, root = _TOTAL.value, pathlib.Path(_ROOT.value)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "tokenizer.model").exists():  # trained once, by a first short run
        warm = arm_config(((0, 8),), 2048, root)
        warm.data.tokenizer = ""
        train_lib.train(warm, root / "tokenizer-run")
        (root / "tokenizer.model").write_bytes(
            (root / "tokenizer-run/tokenizer.model").read_bytes()
        )
    rows, curves = [], {}
    for name, schedule in arms(total).items():
        config = arm_config(schedule, total, root)
        workdir = root / name.split()[0] / name.split()[1]
        start = time.perf_counter()
        train_lib.train(config, workdir)
        wall = time.perf_counter() - start
        logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        tokens = tokens_by_step(logged, config.train.global_batch_size)
        steps = max(tokens)
        assert tokens[steps] >= total > tokens[steps] - LARGE * SEQ_LEN, (name, tokens[steps])
        losses = [(tokens[r["step"]], r["loss"]) for r in logged if "loss" in r]
        noise = [
            (tokens[r["step"]], r["gradient_noise_scale"])
            for r in logged
            if "gradient_noise_scale" in r
        ]
        curves[name] = losses, noise
        rows.append(
            {
                "date": time.strftime("%Y-%m-%d"),
                "arm": name,
                "schedule": str(schedule),
                "stages": [
                    (r["step"], r["global_batch_size"]) for r in logged if "batch_stage" in r
                ],
                "total_tokens": total,
                "optimizer_steps": steps,
                "final_val_loss": [r["val_loss"] for r in logged if "val_loss" in r][-1],
                "final_noise_scale": noise[-1][1] if noise else None,
                "wall_seconds": wall,
                "note": _NOTE.value,
            }
        )
    _, _, slug = results_table.cpu()
    table = results_table.record(
        pathlib.Path(_RESULTS.value) / f"batch-ramp-{slug}",
        rows,
        "# Batch ramp: fixed small, fixed large, scheduled and adaptive batches on one token "
        "budget\n\n"
        "`python -m benchmarks.batch_ramp`: a 2-layer d_model-128 model, rows of 64 tokens, "
        "microbatches of 4 rows, lr in tokens with sqrt batch scaling; see its docstring.",
        [
            "date",
            "arm",
            "tokens",
            "steps",
            "final val_loss",
            "noise scale (tokens)",
            "wall s",
            "note",
        ],
        [
            [
                r["date"],
                r["arm"],
                r["total_tokens"],
                r["optimizer_steps"],
                f"{r['final_val_loss']:.4f}",
                f"{r['final_noise_scale']:,.0f}" if r["final_noise_scale"] else "-",
                f"{r['wall_seconds']:.0f}",
                r["note"],
            ]
            for r in rows
        ],
    )
    print(f"recorded {table}")
    _plot(curves, table.with_suffix(".png"))


def _plot(curves, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (losses, noise) in curves.items():
        left.plot(*zip(*losses), label=name)
        if noise:
            right.plot(*zip(*noise), label=name)
    left.set(xlabel="tokens", ylabel="train loss", title="loss against tokens")
    right.set(xlabel="tokens", ylabel="B_simple (tokens)", title="gradient noise scale")
    right.set_yscale("log")
    left.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"plot {path}")


if __name__ == "__main__":
    app.run(main)
