"""`python -m jaxlm.train --config=configs/tiny.py [--workdir=DIR] [--config.train.steps=N]`.

Validates the config, builds the mesh, data, model and optimizer, then runs the loop:
train steps, periodic logging and evaluation, checkpoints; resumes from the workdir's
latest checkpoint when started again.
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

import jaxlm
from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import metrics as metrics_lib
from jaxlm import model as model_lib
from jaxlm import optim
from jaxlm import sharding as sharding_lib
from jaxlm import step as step_lib
from jaxlm.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "A config file under configs/.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Run directory; default runs/<config name>.")


class _Console:
    """Step lines on the console, around a progress bar when attached to a terminal."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled = enabled
        show_bar = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, unit="step", disable=not show_bar,
                        dynamic_ncols=True)

    def print(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()


def evaluate(eval_step, params, eval_data, batch_sharding) -> float:
    totals = [eval_step(params, sharding_lib.global_batch(b, batch_sharding)) for b in eval_data]
    loss_sum = sum(float(t[0]) for t in totals)
    count = sum(float(t[1]) for t in totals)
    return loss_sum / max(count, 1.0)


def train(config, workdir: str | pathlib.Path) -> dict:
    """Run (or resume) training as `config` says; return the last logged metrics."""
    workdir = pathlib.Path(workdir)
    derived = config_lib.validate(config, jax.device_count())
    t, d = config.train, config.data
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)

    mesh = sharding_lib.make_mesh(derived.mesh_shape)
    rules = sharding_lib.axis_rules(config.mesh.rules)
    model = model_lib.Transformer(config_lib.model_config(config, derived))
    tx = optim.make_optimizer(t)
    factory = step_lib.StateFactory(model, tx, mesh, rules, (derived.micro_batch_size, d.seq_len))

    data = pipeline.build(config, workdir)
    checkpoints = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep)
    start = checkpoints.latest_step() or 0
    if start:
        state, _ = checkpoints.restore(start, factory.abstract)
        print(f"resumed from {checkpoints.path(start)}", flush=True)
    else:
        state = factory.create(jax.random.fold_in(jax.random.key(config.seed), 0))

    train_step = step_lib.make_train_step(factory)
    eval_step = step_lib.make_eval_step(factory)
    accum = t.grad_accum_steps
    train_batches = pipeline.iterate(
        pipeline.train_dataset(data.train_rows, derived.micro_batch_size, config.seed),
        start * accum, d.num_threads, d.prefetch)
    eval_batches = pipeline.eval_dataset(data.val_rows, derived.micro_batch_size, d.eval_batches)
    batch_sharding = factory.batch_sharding

    peak, peak_source = metrics_lib.peak_flops_total(jax.devices())
    flops_per_token = metrics_lib.flops_per_token(config.model, derived.head_dim, d.seq_len)
    tokens_per_step = t.global_batch_size * d.seq_len
    schedule = optim.schedule(t)
    writer = metrics_lib.Writer(workdir, enabled=is_main)
    console = _Console(t.steps, start, enabled=is_main)
    console.print(f"jaxlm {jaxlm.__version__}: {derived.n_params / 1e6:.1f}M params, "
                  f"{jax.device_count()} x {jax.devices()[0].device_kind}, mesh "
                  f"{derived.mesh_shape}; {t.global_batch_size} x {d.seq_len} tokens per step; "
                  f"peak {peak / 1e12:.3g} TFLOP/s ({peak_source})")

    last = {}
    if start == 0:  # where validation loss starts, so a run shows what it learned
        writer.write(0, {"val_loss": evaluate(eval_step, state["params"], eval_batches, batch_sharding)})
    # Throughput is timed from the end of the first step of this process (which compiles).
    timer_start, timed_steps, losses = None, 0, []
    with factory.context():
        for step in range(start + 1, t.steps + 1):
            for _ in range(accum):
                batch = sharding_lib.global_batch(next(train_batches), batch_sharding)
                state, step_metrics = train_step(state, batch)
                losses.append(step_metrics["loss"])
            if timer_start is None:
                jax.block_until_ready(state)
                timer_start = time.perf_counter()
            else:
                timed_steps += 1

            if step % t.log_every == 0 or step == t.steps:
                last = {"loss": float(np.mean(jax.device_get(losses))),
                        "lr": float(schedule(step - 1)),
                        "grad_norm": float(step_metrics["grad_norm"])}
                line = (f"step {step}/{t.steps} | loss {last['loss']:.4f} | lr {last['lr']:.2e} | "
                        f"grad_norm {last['grad_norm']:.3f}")
                if timed_steps:
                    last["tokens_per_second"] = (timed_steps * tokens_per_step
                                                 / (time.perf_counter() - timer_start))
                    last["mfu"] = metrics_lib.mfu(flops_per_token, last["tokens_per_second"], peak)
                    line += f" | tokens/s {last['tokens_per_second']:,.0f} | MFU {100 * last['mfu']:.1f}%"
                writer.write(step, last)
                console.print(line)
                timer_start, timed_steps, losses = time.perf_counter(), 0, []

            if step % t.eval_every == 0 or step == t.steps:
                eval_start = time.perf_counter()
                val_loss = evaluate(eval_step, state["params"], eval_batches, batch_sharding)
                last["val_loss"] = val_loss
                writer.write(step, {"val_loss": val_loss})
                console.print(f"step {step}/{t.steps} | validation loss {val_loss:.4f}")
                timer_start += time.perf_counter() - eval_start  # not training time

            if step % config.checkpoint.every == 0 or step == t.steps:
                checkpoints.save(step, state, {"config": config.to_dict(), "step": step,
                                               "jaxlm_version": jaxlm.__version__,
                                               "tokenizer": data.tokenizer_path})
            console.bar.update(1)

    console.close()
    checkpoints.close()
    writer.close()
    final = checkpoints.latest_step()
    console.print(f"done: metrics {writer.path}, TensorBoard {workdir / 'tensorboard'}, "
                  f"checkpoint {checkpoints.path(final) if final else 'none'}")
    return last


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax and XLA are chatty at INFO
        logging.set_verbosity(logging.WARNING)
    sharding_lib.maybe_initialize_distributed()
    config = _CONFIG.value
    workdir = _WORKDIR.value or str(pathlib.Path("runs") / pathlib.Path(flags.FLAGS["config"].config_filename).stem)
    try:
        train(config, workdir)
    except config_lib.ConfigError as e:
        sys.exit(f"config error: {e}")


if __name__ == "__main__":
    app.run(main)
