"""`python -m jaxlm.train --config=configs/tiny.py [--workdir=DIR] [--config.train.steps=N]`.

Validates the config, builds the mesh, data, model and optimizer, then runs the loop:
train steps, periodic logging and evaluation, checkpoints. Started again with the same
workdir it resumes from the newest readable checkpoint and continues exactly as an
unbroken run would. SIGTERM (what TPU VMs and SLURM send before preemption) or Ctrl-C saves
a checkpoint at the next step boundary and exits with PREEMPTED_EXIT_CODE; a second Ctrl-C
stops at once.
"""

from __future__ import annotations

import os
import sys
import time

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags
from tqdm import tqdm

import jaxlm
from jaxlm import (
    accumulation,
    adaptive_batch,
    cli,
    files,
    goodput,
    platforms,
    profiling,
    seq_len_schedule,
    step_results,
    steps_in_flight,
    stop_signals,
    train_eval,
    wandb_log,
)
from jaxlm import batch_schedule as batch_schedule_lib
from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import metrics as metrics_lib
from jaxlm import run as run_lib
from jaxlm import sharding as sharding_lib
from jaxlm import step as step_lib
from jaxlm.data import pipeline
from jaxlm.errors import NonFiniteError, Preempted

PREEMPTED_EXIT_CODE = 42  # checkpoint saved after SIGTERM: start the same command again

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/tiny.py", "A config file under configs/."
)
_WORKDIR = flags.DEFINE_string("workdir", "", "Run directory; default runs/<config name>.")


class _Console:
    """Step lines on the console, around a progress bar when attached to a terminal."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled = enabled
        show_bar = enabled and sys.stderr.isatty()
        self.bar = tqdm(
            total=total, initial=initial, unit="step", disable=not show_bar, dynamic_ncols=True
        )

    def print(self, line: str) -> None:
        if self.enabled:  # flushed, so piped logs (SLURM, tee) show each line when it happens
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()


def evaluate(eval_step, params, eval_data, batch_sharding) -> float:
    totals = [eval_step(params, sharding_lib.global_batch(b, batch_sharding)) for b in eval_data]
    loss_sum = sum(float(t[0]) for t in totals)
    count = sum(float(t[1]) for t in totals)
    return loss_sum / max(count, 1.0)


def _announce_stage(stages, stage, step, t, console, writer) -> None:
    """Console line where a run starts or resumes in a stage of data.seq_len_schedule, and a
    metrics row {"seq_len", "rows_per_step"} at the step where the stage starts."""
    if len(stages) == 1:
        return
    seq_len = stages[stage][1]
    rows = t.global_batch_size * stages[-1][1] // seq_len
    begins = step == stages[stage][0] + 1
    console.print(
        f"step {step}/{t.steps} | seq_len stage {stage + 1}/{len(stages)} "
        f"{'starts' if begins else 'continues'}: {rows} rows of {seq_len} tokens "
        "per step"
    )
    if begins:
        writer.write(step, {"seq_len": seq_len, "rows_per_step": rows})


def train(config, workdir: epath.PathLike, on_validation=None) -> dict:
    """Run (or resume) training as `config` says, in `workdir` (a local path or gs://...);
    return the last logged metrics. `on_validation(step, val_loss)`, if given, hears each
    validation after step 0 (a sweep's pruner; an exception it raises stops the run).

    SIGTERM and Ctrl-C are caught from the start: one that comes while the run loads, restores or
    compiles (a cluster's early warning, SLURM's --signal=TERM@N) saves after the first step.
    """
    stop = stop_signals.StopRequest()
    try:
        return _train(config, files.path(workdir), stop, on_validation)
    finally:
        stop.restore()


def _train(config, workdir: epath.Path, stop: stop_signals.StopRequest, on_validation) -> dict:
    factory, derived = step_lib.build(config)  # validates the config first
    config = batch_schedule_lib.with_total_steps(config)  # train.steps from train.total_tokens
    tasks = train_eval.TaskEval.at_start(config)  # an unloadable lm-eval task stops us here
    t, d = config.train, config.data
    is_main = jax.process_index() == 0
    if is_main:
        files.make_dir(workdir, "--workdir")
    checkpoints = checkpoint_lib.Checkpointer(
        run_lib.checkpoints_dir(workdir),
        keep=config.checkpoint.keep,
        keep_every=config.checkpoint.keep_every,
        probe=is_main,
    )
    console = _Console(t.steps, 0, enabled=is_main)
    here = jax.process_index()  # every process keeps its own account of its time
    account = goodput.Recorder(
        run_lib.goodput_log(workdir, here), run_lib.goodput_events(workdir, here)
    )
    account.mark("startup")
    begin = run_lib.initial_state(config, factory, checkpoints, console.print)
    account.mark("restore" if begin.step else "startup")
    account.resumed_at(begin.step)
    start, state = begin.step, begin.state
    # The adaptive ramp's decisions so far (none afresh) set the batch schedule and train.steps.
    ramp = adaptive_batch.Ramp(config, begin.record.get("batch_decisions", ()))
    if ramp.decisions:
        factory.tx = step_lib.optimizer_for(config, factory.model.cfg)
    console.bar.total = t.steps
    if start >= t.steps:  # a rerun of a finished run, or train.steps lowered below it
        return _nothing_to_train(start, t.steps, console, checkpoints)
    # Checkpoints written before the log window was saved resume with an empty one.
    window = metrics_lib.LogWindow(begin.record.get("log_window"))
    init_tokenizer = "" if d.tokenizer else run_lib.recorded_tokenizer(config.checkpoint.init_from)
    data = pipeline.build(config, workdir, init_tokenizer)
    # The first step this run logs: 0 afresh (its val_loss), else the one after the checkpoint.
    # Both logs forget what an earlier run logged from there on.
    first_logged = start + 1 if start else 0
    if is_main:
        metrics_lib.keep_rows_before(workdir / metrics_lib.Writer.FILENAME, first_logged)
    wandb_run = wandb_log.WandbRun(config, workdir) if is_main and t.wandb_project else None
    writer = metrics_lib.Writer(
        workdir, enabled=is_main, first_step=first_logged, sinks=(wandb_run,) if wandb_run else ()
    )
    console.bar.update(start)

    train_step = step_lib.make_train_step(factory)
    eval_step = step_lib.make_eval_step(factory)
    train_batches = _train_batches(config, derived, data, begin.record.get("data"), console)
    # The validation set is the first eval_batches * global_batch_size rows whatever the
    # microbatch, so runs that differ only in accumulation report the same val_loss.
    eval_batches = pipeline.eval_dataset(
        data.val_rows, derived.micro_batch_size, d.eval_batches * t.grad_accum_steps
    )

    def validation_loss():
        return evaluate(eval_step, steps.state["params"], eval_batches, factory.batch_sharding)

    def run_call(state, missing=None):  # one microbatch (of a window, or a replacement)
        with account.inside("data_wait"):
            batch, targets, accum = feed.draw(missing)
        state, metrics = train_step(state, batch, targets, accum)
        return state, {**metrics, "window_targets": targets}

    def task_rows(step):  # train.eval_tasks, logged beside val_loss
        return (
            tasks.log(steps.state["params"], factory, data, step, writer, console) if tasks else {}
        )

    throughput = metrics_lib.Throughput(_announce_run(config, derived, factory, console))
    stages = _Stages(config, derived, console, writer)
    batch_stages = batch_schedule_lib.Progress(config, console.print, writer)
    nonfinite = step_results.NonFinitePolicy(t, console, window)
    feed = accumulation.WindowFeed(
        train_batches,
        lambda: stages.seq_len,
        lambda step: batch_schedule_lib.accum_at(config, step),
        factory.batch_sharding,
        first_step=start + 1,
    )
    steps = steps_in_flight.StepsInFlight(run_call, state, t.grad_accum_steps)
    del state  # the steps in flight own it now (donated at each call)
    profiler = profiling.StepProfiler(t, workdir / "profile", console.print)
    last, stopping, rebuilt = {}, False, False
    account.mark("startup")
    if start == 0:  # where validation loss starts, so a run shows what it learned
        val_loss = validation_loss()
        writer.write(0, {"val_loss": val_loss})
        console.print(f"step 0/{t.steps} | validation loss {val_loss:.4f}")
        account.mark("eval", step=0)
        task_rows(0)
    try:
        with factory.context():
            step = start
            while step < t.steps:  # the adaptive ramp shortens train.steps as it doubles
                step += 1
                compiles = not throughput.started
                new_length = stages.stage != stages.at(step)
                if rebuilt or (new_length and stages.stage is not None):
                    # this step compiles: for a new row length, or a new batch stage's optimizer
                    jax.block_until_ready(steps.state)
                    compiles, rebuilt = True, False
                    throughput.pause()
                if new_length:
                    stages.enter(step)
                # The next step is queued behind this one unless this step's state is needed
                # as it is (saved, evaluated, the last of its row length or batch stage) or it
                # compiles; with train.nonfinite="skip" never (see _state_needed_after).
                holds = compiles or stopping or _state_needed_after(step, config, stages)
                steps.accum = batch_stages.enter(step)
                profiler.before_step(step, compiles)
                steps.dispatch(1 if holds or profiler.edge(step) else 2)
                applied = []  # (|micro gradient|^2, targets, window targets) of each applied
                calls, grad_norm = steps.finish_step(
                    lambda result, step=step, applied=applied: step_results.applied(
                        result, window, nonfinite, step, applied
                    )
                )
                micro_sq, micro_tokens, targets = zip(*applied)
                window.noise_scale.add_window(micro_sq, micro_tokens, grad_norm**2, targets[0])
                if compiles:
                    jax.block_until_ready(steps.state)
                    throughput.resume()
                else:
                    throughput.add(
                        derived.micro_batch_size * d.seq_len, calls, stages.flops_per_token
                    )
                profiler.after_step(step, steps.state)
                account.mark("compile" if compiles else "productive", step=step)

                if step % t.log_every == 0 or step == t.steps:
                    badput = goodput.fractions(account.summary())
                    last = step_results.log_row(
                        step, config, window, throughput, grad_norm, writer, console, badput
                    )
                    decision = ramp.decide(step, window.noise_scale.value())
                    if decision:  # the next update takes twice the rows
                        console.print(decision)
                        console.bar.total = t.steps
                        factory.tx = step_lib.optimizer_for(config, factory.model.cfg)
                        train_step, rebuilt = step_lib.make_train_step(factory), True

                if step % t.eval_every == 0 or step == t.steps:
                    eval_start = time.perf_counter()
                    last["val_loss"] = val_loss = validation_loss()
                    writer.write(step, {"val_loss": val_loss})
                    console.print(f"step {step}/{t.steps} | validation loss {val_loss:.4f}")
                    last.update(task_rows(step))
                    throughput.leave_out_since(eval_start)  # not training time
                    account.mark("eval", step=step)
                    if on_validation:
                        on_validation(step, val_loss)

                # A stop request saves here, or after the step already in flight.
                stopping = stop.agreed()
                preempted = stopping and not steps.in_flight
                if step % config.checkpoint.every == 0 or step == t.steps or preempted:
                    console.print(
                        f"step {step}/{t.steps} | saving checkpoint {checkpoints.path(step)}"
                    )
                    writer.flush()  # the rows up to `step` are on disk before the checkpoint
                    checkpoints.save(
                        step,
                        factory.trained(steps.state),
                        _record(config, step, data, train_batches, window, begin, ramp),
                    )
                    account.mark("checkpoint_save", step=step)
                console.bar.update(1)
                if preempted and step < t.steps:
                    raise Preempted(step)
    finally:
        profiler.close()
        console.close()
        writer.close()
        checkpoints.close()  # waits for the last async save to be complete on disk
        account.mark("checkpoint_save")
        account.close()
        if wandb_run:
            wandb_run.close(goodput.fractions(account.summary()))

    final = checkpoints.latest_step()
    console.print(
        f"done: metrics {writer.path}, TensorBoard {workdir / 'tensorboard'}, "
        f"checkpoint {checkpoints.path(final) if final else 'none'}"
    )
    console.print(goodput.describe(account.summary()))
    return last


def _train_batches(config, derived, data, data_state, console) -> pipeline.Batches:
    """The training batches, where the resumed checkpoint left them (`data_state`)."""
    d = config.data
    batches = pipeline.train_batches(data.train_rows, derived.micro_batch_size, config)
    if data_state:
        batches.set_state(data_state["iterator"])
        if data_state["fingerprint"] != data.fingerprint:
            console.print(
                f"warning: the data ({d.source}, seq_len, seed) differs from the "
                "checkpoint's; continuing at the saved batch index of the new data"
            )
    console.print(f"data: {d.source}, train: {data.train_rows.describe()}")
    return batches


def _announce_run(config, derived, factory, console) -> float:
    """Print what runs where (version, params, devices, mesh, memory); the devices' peak
    FLOP/s, which MFU is measured against."""
    t, d = config.train, config.data
    peak, peak_source = metrics_lib.peak_flops_total(jax.devices())
    console.print(
        f"jaxlm {jaxlm.__version__}: {derived.n_params / 1e6:.1f}M params, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, mesh "
        f"{derived.mesh_shape}; {t.global_batch_size} x {d.seq_len} tokens per step; "
        f"peak {peak / 1e12:.3g} TFLOP/s ({peak_source})"
    )
    console.print(metrics_lib.memory_per_device(factory))
    return peak


class _Stages:
    """Which stage of data.seq_len_schedule a step is in: its row length and FLOPs per token."""

    def __init__(self, config, derived, console, writer):
        self.config, self.derived, self.console, self.writer = config, derived, console, writer
        self.stage = self.seq_len = self.flops_per_token = None

    @property
    def stages(self):  # read each time: with a batch schedule, the adaptive ramp moves them
        return seq_len_schedule.seq_len_stages(self.config)

    def at(self, step: int) -> int:
        return seq_len_schedule.stage_at(self.stages, step)

    def enter(self, step: int) -> None:
        """Move to `step`'s stage and announce it."""
        t = self.config.train
        self.stage = self.at(step)
        self.seq_len = self.stages[self.stage][1]
        self.flops_per_token = metrics_lib.flops_per_token(
            self.config.model,
            self.derived.head_dim,
            self.seq_len,
            lora_rank=t.lora_rank,
            lora_targets=tuple(t.lora_targets),
        )
        _announce_stage(self.stages, self.stage, step, t, self.console, self.writer)


def _nothing_to_train(start: int, steps: int, console, checkpoints) -> dict:
    """A run already at or past train.steps: say so in one line, train nothing."""
    console.print(
        f"the run is already at step {start} of --config.train.steps={steps}: "
        "nothing to train; raise train.steps to continue"
    )
    console.close()
    checkpoints.close()
    return {}


def _state_needed_after(step: int, config, stages) -> bool:
    """Whether `step`'s state is used as it is: saved, evaluated, the last of its stage's
    row length (the next compiles for another) or of its batch stage (the next accumulates
    another count), or logged (so tokens/s and MFU time exactly the steps they count: a
    device that executes as it is dispatched, as XLA's CPU client can, would otherwise put
    the next step's time in this row). No step is dispatched past such a one, nor past any with
    train.nonfinite="skip": a skipped microbatch is replaced by one drawn for its own window
    (jaxlm.accumulation), which a step already in flight would have taken."""
    t = config.train
    accum = batch_schedule_lib.accum_at(config, step)
    return (
        t.nonfinite == "skip"
        or step % config.checkpoint.every == 0
        or step % t.eval_every == 0
        or step % t.log_every == 0
        or step == t.steps
        or stages.at(step + 1) != stages.stage
        or batch_schedule_lib.accum_at(config, step + 1) != accum
    )


def _record(config, step, data, train_batches, window, begin, ramp) -> dict:
    """A checkpoint's JSON record: what resuming, generating and converting read back."""
    return {
        "step": step,
        "config": config.to_dict(),
        "jaxlm_version": jaxlm.__version__,
        "tokenizer": data.tokenizer_path,
        "data": {"iterator": train_batches.get_state(), "fingerprint": data.fingerprint},
        "rng": {"seed": config.seed},
        "log_window": window.state(),
        # A LoRA checkpoint holds adapters only: the base they were trained beside.
        **({"lora_base": begin.lora_base} if begin.lora_base else {}),
        **({"batch_decisions": ramp.state()} if ramp.enabled else {}),
    }


def main(argv):
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax and XLA are chatty at INFO
        logging.set_verbosity(logging.WARNING)
    sharding_lib.maybe_initialize_distributed()
    config = _CONFIG.value
    config_name = os.path.splitext(
        os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"]).split(":", 1)[0])
    )[0]
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
    except KeyboardInterrupt:  # a second Ctrl-C
        sys.exit("interrupted: stopped without saving; the newest checkpoint resumes")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
