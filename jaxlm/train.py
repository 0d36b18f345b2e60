"""`python -m jaxlm.train --config=configs/tiny.py [--workdir=DIR] [--config.train.steps=N]`.

Validates the config, builds the mesh, data, model and optimizer, then runs the loop:
train steps, periodic logging and evaluation, checkpoints. Started again with the same
workdir it resumes from the newest readable checkpoint and continues exactly as an
unbroken run would. SIGTERM (what TPU VMs and SLURM send before preemption) saves a
checkpoint at the next step boundary and exits with PREEMPTED_EXIT_CODE.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm import tqdm

import jaxlm
from jaxlm import checkpoint as checkpoint_lib
from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm import files
from jaxlm import lora as lora_lib
from jaxlm import metrics as metrics_lib
from jaxlm import optim
from jaxlm import platforms
from jaxlm import sharding as sharding_lib
from jaxlm import step as step_lib
from jaxlm.data import pipeline
from jaxlm.errors import NonFiniteError, Preempted

PREEMPTED_EXIT_CODE = 42  # checkpoint saved after SIGTERM: start the same command again

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
        if self.enabled:  # flushed, so piped logs (SLURM, tee) show each line when it happens
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()


class _NonFinitePolicy:
    """train.nonfinite: stop at a non-finite microbatch ("raise"), or count and go on ("skip")
    until train.max_skips_in_a_row in a row. The step never applies such an update. The
    counts live in the checkpointed log window, so a resumed run counts on from them."""

    def __init__(self, t, console, window: metrics_lib.LogWindow):
        self.t, self.console, self.window = t, console, window

    def applied(self, result: dict, step: int) -> bool:
        w = self.window
        if result["finite"]:
            w.skipped_in_a_row = 0
            return True
        w.skipped_in_a_row, w.skipped_total = w.skipped_in_a_row + 1, w.skipped_total + 1
        what = f"non-finite loss {result['loss']} / grad_norm {result['grad_norm']} at step {step}"
        if self.t.nonfinite == "raise":
            raise NonFiniteError(f"{what}; the update was not applied and nothing was saved "
                                 "(train.nonfinite='raise')")
        self.console.print(f"step {step}/{self.t.steps} | {what}: update skipped")
        if w.skipped_in_a_row >= self.t.max_skips_in_a_row:
            raise NonFiniteError(f"{what}: {w.skipped_in_a_row} non-finite microbatches in a row "
                                 f"(train.max_skips_in_a_row={self.t.max_skips_in_a_row}); stopping")
        return False


class _SigtermFlag:
    """Set by SIGTERM; every process agrees on it at step boundaries."""

    def __init__(self):
        self.local = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.local = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.local
        return bool(np.any(multihost_utils.process_allgather(np.array(self.local))))

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def evaluate(eval_step, params, eval_data, batch_sharding) -> float:
    totals = [eval_step(params, sharding_lib.global_batch(b, batch_sharding)) for b in eval_data]
    loss_sum = sum(float(t[0]) for t in totals)
    count = sum(float(t[1]) for t in totals)
    return loss_sum / max(count, 1.0)


def _keep_metrics_before(path: epath.Path, first_step: int) -> None:
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


def _initial_state(config, factory, checkpoints, console):
    """(step, checkpoint record or {}, state, LoRA base reference or None): resumed,
    fine-tuned from init_from, or fresh."""
    lora_lib.check_same_settings(config.train, checkpoints)  # before a mismatch reads as damage
    resumed = checkpoints.restore_latest_readable(factory.trained(factory.abstract))
    if resumed:
        step, trained, meta = resumed
        console.print(f"resumed from {checkpoints.path(step)}")
        base = meta.get("lora_base")
        if base:
            trained = factory.assemble(trained, lora_lib.restore_base(
                base, factory.frozen_params(factory.abstract), step))
            console.print(f"LoRA adapters beside the frozen base {base['path']} (step "
                          f"{base['step']}), as when this run started")
        return step, meta, trained, base
    rng = jax.random.fold_in(jax.random.key(config.seed), 0)
    if factory.lora:
        frozen, source_step = checkpoint_lib.restore_params(
            config.checkpoint.init_from, factory.frozen_params(factory.abstract))
        base = {"path": str(checkpoint_lib.split_step(
            files.path(config.checkpoint.init_from))[0]), "step": source_step}
        console.print(f"LoRA rank {config.train.lora_rank} on {','.join(config.train.lora_targets)}"
                      f" beside the frozen base {base['path']} (step {source_step})")
        return 0, {}, factory.assemble(factory.create_trained(rng), frozen), base
    state = factory.create(rng)
    if config.checkpoint.init_from:
        params, source_step = checkpoint_lib.restore_params(config.checkpoint.init_from,
                                                            factory.abstract["params"])
        state["params"] = params
        console.print(f"initialised params from {config.checkpoint.init_from} (step {source_step})")
    return 0, {}, state, None


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}"
        n /= 1024


def _memory_per_device(factory) -> str:
    """What each device holds of the params and the optimizer state (its largest shards)."""
    def size(tree):
        return sum(np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                   for a in jax.tree.leaves(tree))

    abstract = factory.abstract
    params = f"params {_bytes(size(abstract['params']))}"
    if factory.lora:
        params += f" (LoRA adapters {_bytes(size(factory.trained(abstract)['params']))}, the rest frozen)"
    return f"memory per device: {params}, optimizer state {_bytes(size(abstract['opt_state']))}"


def _announce_stage(stages, stage, step, t, console, writer) -> None:
    """Console line where a run starts or resumes in a stage of data.seq_len_schedule, and a
    metrics row {"seq_len", "rows_per_step"} at the step where the stage starts."""
    if len(stages) == 1:
        return
    seq_len = stages[stage][1]
    rows = t.global_batch_size * stages[-1][1] // seq_len
    begins = step == stages[stage][0] + 1
    console.print(f"step {step}/{t.steps} | seq_len stage {stage + 1}/{len(stages)} "
                  f"{'starts' if begins else 'continues'}: {rows} rows of {seq_len} tokens "
                  "per step")
    if begins:
        writer.write(step, {"seq_len": seq_len, "rows_per_step": rows})


def train(config, workdir: epath.PathLike) -> dict:
    """Run (or resume) training as `config` says, in `workdir` (a local path or gs://...);
    return the last logged metrics.

    SIGTERM is caught from the start: one that comes while the run loads, restores or
    compiles (a cluster's early warning, SLURM's --signal=TERM@N) saves after the first step.
    """
    sigterm = _SigtermFlag()
    try:
        return _train(config, files.path(workdir), sigterm)
    finally:
        sigterm.restore()


def _train(config, workdir: epath.Path, sigterm: _SigtermFlag) -> dict:
    factory, derived = step_lib.build(config)  # validates the config first
    t, d = config.train, config.data
    is_main = jax.process_index() == 0
    if is_main:
        files.make_dir(workdir, "--workdir")
    checkpoints = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep,
                                              keep_every=config.checkpoint.keep_every,
                                              probe=is_main)
    if t.lora_rank and not config.checkpoint.init_from:
        raise config_lib.ConfigError(
            f"config.train.lora_rank={t.lora_rank} needs config.checkpoint.init_from: the base "
            "model the adapters train beside (a run's checkpoints/, or a model imported with "
            "python -m jaxlm.convert --from_hf); or set train.lora_rank=0")
    console = _Console(t.steps, 0, enabled=is_main)
    start, resumed_meta, state, lora_base = _initial_state(config, factory, checkpoints, console)
    data_state = resumed_meta.get("data")
    # Checkpoints written before the log window was saved resume with an empty one.
    window = metrics_lib.LogWindow(resumed_meta.get("log_window"))
    data = pipeline.build(config, workdir)
    # The first step this run logs: 0 afresh (its val_loss), else the one after the checkpoint.
    # Both logs forget what an earlier run logged from there on.
    first_logged = start + 1 if start else 0
    if is_main:
        _keep_metrics_before(workdir / metrics_lib.Writer.FILENAME, first_logged)
    writer = metrics_lib.Writer(workdir, enabled=is_main, first_step=first_logged)
    console.bar.update(start)

    train_step = step_lib.make_train_step(factory)
    eval_step = step_lib.make_eval_step(factory)
    train_batches = pipeline.train_batches(data.train_rows, derived.micro_batch_size, config)
    if data_state:
        train_batches.set_state(data_state["iterator"])
        if data_state["fingerprint"] != data.fingerprint:
            console.print(f"warning: the data ({d.source}, seq_len, seed) differs from the "
                          "checkpoint's; continuing at the saved batch index of the new data")
    console.print(f"data: {d.source}, train: {data.train_rows.describe()}")
    eval_batches = pipeline.eval_dataset(data.val_rows, derived.micro_batch_size, d.eval_batches)
    batch_sharding = factory.batch_sharding

    peak, peak_source = metrics_lib.peak_flops_total(jax.devices())
    stages = config_lib.seq_len_stages(config)
    tokens_per_microbatch = derived.micro_batch_size * d.seq_len  # the same in every stage
    schedule = optim.schedule(t)
    console.print(f"jaxlm {jaxlm.__version__}: {derived.n_params / 1e6:.1f}M params, "
                  f"{jax.device_count()} x {jax.devices()[0].device_kind}, mesh "
                  f"{derived.mesh_shape}; {t.global_batch_size} x {d.seq_len} tokens per step; "
                  f"peak {peak / 1e12:.3g} TFLOP/s ({peak_source})")
    console.print(_memory_per_device(factory))

    def save(step):
        console.print(f"step {step}/{t.steps} | saving checkpoint {checkpoints.path(step)}")
        writer.flush()  # the rows up to `step` are on disk before the checkpoint can be
        checkpoints.save(step, factory.trained(state), {
            "step": step, "config": config.to_dict(), "jaxlm_version": jaxlm.__version__,
            "tokenizer": data.tokenizer_path,
            "data": {"iterator": train_batches.get_state(), "fingerprint": data.fingerprint},
            "rng": {"seed": config.seed}, "log_window": window.state(),
            # A LoRA checkpoint holds adapters only: the base they were trained beside.
            **({"lora_base": lora_base} if lora_base else {})})

    last = {}
    if start == 0:  # where validation loss starts, so a run shows what it learned
        writer.write(0, {"val_loss": evaluate(eval_step, state["params"], eval_batches, batch_sharding)})
    # Throughput is timed from the end of this process's first step (which compiles); the
    # first step of each later stage compiles too, and its time is left out.
    timer_start, timed_tokens, timed_flops = None, 0, 0.0
    stage = None
    nonfinite = _NonFinitePolicy(t, console, window)
    try:
        with factory.context():
            for step in range(start + 1, t.steps + 1):
                compiles = timer_start is None
                if stage != config_lib.stage_at(stages, step):
                    if stage is not None:  # this step compiles for the new length: not timed
                        jax.block_until_ready(state)
                        compiles, untimed_from = True, time.perf_counter()
                    stage = config_lib.stage_at(stages, step)
                    seq_len = stages[stage][1]
                    flops_per_token = metrics_lib.flops_per_token(
                        config.model, derived.head_dim, seq_len, lora_rank=t.lora_rank,
                        lora_targets=tuple(t.lora_targets))
                    _announce_stage(stages, stage, step, t, console, writer)
                # One optimizer update: grad_accum_steps finite microbatches. A non-finite
                # one changes nothing; with nonfinite="skip" another microbatch replaces it.
                applied = calls = 0
                while applied < t.grad_accum_steps:
                    results = []
                    for _ in range(t.grad_accum_steps - applied):
                        rows = pipeline.cut_rows(next(train_batches), seq_len)
                        batch = sharding_lib.global_batch(rows, batch_sharding)
                        state, metrics = train_step(state, batch)
                        calls += 1
                        results.append(metrics)
                    for result in jax.device_get(results):
                        window.add(result["loss"])
                        if nonfinite.applied(result, step):
                            applied, grad_norm = applied + 1, float(result["grad_norm"])
                if compiles:
                    jax.block_until_ready(state)
                    if timer_start is None:
                        timer_start = time.perf_counter()
                    else:
                        timer_start += time.perf_counter() - untimed_from
                else:
                    timed_tokens += tokens_per_microbatch * calls
                    timed_flops += flops_per_token * tokens_per_microbatch * calls

                if step % t.log_every == 0 or step == t.steps:
                    last = {"loss": window.mean_loss(),
                            "lr": float(schedule(step - 1)),
                            "grad_norm": grad_norm}
                    line = (f"step {step}/{t.steps} | loss {last['loss']:.4f} | lr {last['lr']:.2e}"
                            f" | grad_norm {last['grad_norm']:.3f}")
                    if window.skipped_total:
                        last["skipped_microbatches"] = window.skipped_total
                        line += f" | skipped {window.skipped_total}"
                    if timed_tokens:
                        last["tokens_per_second"] = timed_tokens / (time.perf_counter() - timer_start)
                        last["mfu"] = metrics_lib.mfu(timed_flops / timed_tokens,
                                                      last["tokens_per_second"], peak)
                        line += (f" | tokens/s {last['tokens_per_second']:,.0f}"
                                 f" | MFU {100 * last['mfu']:.1f}%")
                    writer.write(step, last)
                    console.print(line)
                    window.reset()
                    timer_start, timed_tokens, timed_flops = time.perf_counter(), 0, 0.0

                if step % t.eval_every == 0 or step == t.steps:
                    eval_start = time.perf_counter()
                    val_loss = evaluate(eval_step, state["params"], eval_batches, batch_sharding)
                    last["val_loss"] = val_loss
                    writer.write(step, {"val_loss": val_loss})
                    console.print(f"step {step}/{t.steps} | validation loss {val_loss:.4f}")
                    timer_start += time.perf_counter() - eval_start  # not training time

                preempted = sigterm.agreed()
                if step % config.checkpoint.every == 0 or step == t.steps or preempted:
                    save(step)
                console.bar.update(1)
                if preempted and step < t.steps:
                    raise Preempted(step)
    finally:
        console.close()
        writer.close()
        checkpoints.close()  # waits for the last async save to be complete on disk

    final = checkpoints.latest_step()
    console.print(f"done: metrics {writer.path}, TensorBoard {workdir / 'tensorboard'}, "
                  f"checkpoint {checkpoints.path(final) if final else 'none'}")
    return last


def main(argv):
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax and XLA are chatty at INFO
        logging.set_verbosity(logging.WARNING)
    sharding_lib.maybe_initialize_distributed()
    config = _CONFIG.value
    config_name = os.path.splitext(os.path.basename(config_flags.get_config_filename(
        flags.FLAGS["config"]).split(":", 1)[0]))[0]
    workdir = _WORKDIR.value or os.path.join("runs", config_name)
    try:
        train(config, workdir)
    except config_lib.ConfigError as e:
        sys.exit(f"config error: {e}")
    except (checkpoint_lib.CheckpointError, NonFiniteError, files.PathError) as e:
        sys.exit(f"error: {e}")
    except Preempted as e:
        print(f"{e}; start the same command again to resume", flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
