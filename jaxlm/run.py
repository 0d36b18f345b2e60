"""The one module that knows a run directory: find it, read it, restore from it.

A run directory (python -m jaxlm.train --workdir=RUN) holds RUN/checkpoints/STEP/{state,
meta}: the orbax train state and a JSON record of the config, the tokenizer, the data
position and, for a LoRA run, the base checkpoint its adapters were trained beside. A run
is named by RUN, RUN/checkpoints or one step in it. What reads one comes here: generating
and scoring (`load`, with the flags those CLIs share), converting (`host_params`), training
(`initial_state`: resume, fine-tune from init_from, or LoRA beside a base) and the data
pipeline's "the tokenizer of the model init_from names" (`recorded_tokenizer`, which train
hands it). jaxlm.checkpoint is the orbax wrapper underneath.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import files, param_layout
from jaxlm import lora as lora_lib
from jaxlm import model as model_lib
from jaxlm.errors import RunError

CHECKPOINTS = "checkpoints"  # RUN/checkpoints/STEP/{state,meta}


def checkpoints_dir(run_dir: epath.PathLike) -> epath.Path:
    return files.path(run_dir) / CHECKPOINTS


def locate(path: epath.PathLike) -> tuple[epath.Path, int | None]:
    """(checkpoints directory, step or None for the newest) of RUN[/checkpoints[/STEP]]."""
    path = files.path(path)
    if not (path / "state").is_dir() and (path / CHECKPOINTS).is_dir():
        path = path / CHECKPOINTS
    return checkpoint_lib.split_step(path)


def read_record(directory: epath.Path, step: int | None = None):
    """(step, its JSON record) of `step` or of the newest; the record is None when there is
    no such checkpoint (the step None when there is none at all)."""
    manager, step = checkpoint_lib.open_read_only(directory, step)
    try:
        if step is None or step not in manager.all_steps():
            return step, None
        return step, checkpoint_lib.read_meta(manager, step)
    finally:
        manager.close()


def recorded_tokenizer(init_from: str) -> str:
    """The tokenizer recorded by the checkpoint `init_from` names, if that file exists; else
    "" (SFT data is tokenized with the model's own tokenizer)."""
    if not init_from:
        return ""
    step, record = read_record(
        *checkpoint_lib.split_step(epath.Path(init_from).expanduser().absolute())
    )
    recorded = record.get("tokenizer", "") if step and record else ""
    return recorded if recorded and epath.Path(recorded).is_file() else ""


def config_from_record(saved: dict):
    """The run's ConfigDict from the dict its checkpoint recorded (JSON turned tuples into
    lists: put them back where the schema has tuples)."""
    from jaxlm import config as config_lib

    def merge(node, values, where):
        for key, value in values.items():
            if key not in node:
                raise RunError(
                    f"the checkpoint's config has a field {where}{key} this "
                    "jaxlm does not know; generate with the jaxlm that trained it"
                )
            if hasattr(node[key], "keys"):
                merge(node[key], value, f"{where}{key}.")
            else:
                node[key] = _tuples(value) if isinstance(node[key], tuple) else value

    config = config_lib.default_config()
    merge(config, saved, "config.")
    return config


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def find_tokenizer(run_dir: epath.Path, recorded: str, given: str | None):
    """(the tokenizer, its file): `given`, else the recorded one, else RUN/tokenizer.model."""
    from jaxlm.data import tokenizer as tokenizer_lib

    if given:
        return tokenizer_lib.load(given, field="--tokenizer"), str(given)
    for candidate in (recorded, run_dir / "tokenizer.model"):
        if candidate and epath.Path(candidate).is_file():
            return tokenizer_lib.load(candidate, field="the run's tokenizer"), str(candidate)
    raise RunError(
        f"{run_dir} has no tokenizer: its checkpoint records {recorded or 'none'!r}, which is "
        f"not a file, and there is no {run_dir / 'tokenizer.model'}; pass --tokenizer=PATH to "
        "the sentencepiece model it was trained with"
    )


def abstract_params(model, mesh, rules):
    """Shapes, dtypes and shardings of `model`'s params on `mesh`, nothing allocated."""
    from jaxlm import step as step_lib

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        )
    return step_lib.sharded_shapes(boxed, mesh, rules)[1]


# ---------------------------------------------------------------- a run to generate or score


@dataclasses.dataclass
class Run:
    """A restored run: its params (on `mesh`), model config, context length, tokenizer, the
    logical rules the params are sharded by, its step and its ConfigDict."""

    params: dict
    config: model_lib.ModelConfig
    max_len: int
    tokenizer: object
    mesh: jax.sharding.Mesh
    rules: tuple
    step: int
    tokenizer_path: str = ""
    run_config: object = None  # the ConfigDict, as adapted to this mesh

    def kwargs(self) -> dict:
        """The keyword arguments of jaxlm.generate's `generate` / `stream` this run fixes."""
        return dict(
            max_len=self.max_len, eos_id=self.tokenizer.eos_id(), mesh=self.mesh, rules=self.rules
        )


def load(
    path: epath.PathLike,
    tokenizer: str | None = None,
    step: int | None = None,
    tensor: int | None = None,
    devices=None,
    shard_rows: bool = False,
    unstack: bool = True,
) -> Run:
    """A training run's newest (or `step`'s) params, restored onto a generation mesh over
    `devices` (default: all): tensor-parallel `tensor` ways (default: as the run trained, if
    that divides the devices) and FSDP over the rest. Weights keep their training layout.
    Rows are split over the FSDP devices with `shard_rows` (scoring many rows, jaxlm.eval),
    else not (a generation batch is small). With `unstack` (for generating) the layers'
    weights are unstacked (param_layout.for_decoding); without, they stay as training scans
    them."""
    from jaxlm import config as config_lib
    from jaxlm import sharding as sharding_lib

    run_dir = files.path(path)
    directory = run_dir / CHECKPOINTS
    if not directory.is_dir():
        raise RunError(
            f"--from={str(run_dir)!r}: no checkpoints/ directory there; give "
            "a run directory (python -m jaxlm.train --workdir=...)"
        )
    step, record = read_record(directory, step)
    if record is None:
        manager, _ = checkpoint_lib.open_read_only(directory)
        steps = list(manager.all_steps())
        manager.close()
        raise RunError(
            f"{directory} has no checkpoint{'' if step is None else f' {step}'} (it has {steps})"
        )
    if record.get("lora_base"):
        raise RunError(
            f"{run_dir} is a LoRA run (its checkpoints hold adapters only); "
            f"merge it first: python -m jaxlm.convert --from_run={run_dir} "
            "--merge_lora --to=NEW_RUN, then --from=NEW_RUN"
        )
    sp, tokenizer_path = find_tokenizer(run_dir, record.get("tokenizer", ""), tokenizer)

    config = config_from_record(record["config"])
    devices = list(devices if devices is not None else jax.devices())
    if tensor is None:
        tensor = config.mesh.tensor if len(devices) % config.mesh.tensor == 0 else 1
    # The cached path has its own attention: the training kernel and remat do not matter.
    config.mesh.update(dict(data=1, fsdp=-1, tensor=tensor, sequence=1))
    config.model.update(dict(attention="xla", remat="none"))
    config.data.seq_len_schedule = ()
    config.train.update(dict(global_batch_size=len(devices), grad_accum_steps=1, loss_chunks=1))
    config.train.update(dict(batch_schedule=(), total_tokens=0, warmup_tokens=0))
    try:
        derived = config_lib.validate(config, len(devices))
    except config_lib.ConfigError as e:
        raise RunError(
            f"cannot generate from {run_dir} on {len(devices)} devices with tensor={tensor}: {e}"
        ) from e
    cfg = config_lib.model_config(config, derived)
    if sp.vocab_size() > cfg.vocab_size:
        raise RunError(
            f"the tokenizer has {sp.vocab_size()} pieces but the model only "
            f"{cfg.vocab_size}: it is not the run's tokenizer"
        )
    mesh = sharding_lib.make_mesh(derived.mesh_shape, devices)
    rows = () if shard_rows else (("batch", None),)
    rules = sharding_lib.axis_rules(tuple(config.mesh.rules) + rows + (("length", None),))
    abstract = abstract_params(model_lib.Transformer(cfg), mesh, rules)
    params, step = checkpoint_lib.restore_params(directory / str(step), abstract)
    if unstack:
        params, cfg = param_layout.for_decoding(params, cfg, free=True)
    return Run(params, cfg, int(config.data.seq_len), sp, mesh, rules, step, tokenizer_path, config)


def define_flags():
    """The flags that pick a run's checkpoint and its mesh (jaxlm.generate, jaxlm.eval)."""
    from absl import flags

    flags.DEFINE_string("from", None, "A run directory (python -m jaxlm.train --workdir).")
    flags.DEFINE_string(
        "tokenizer",
        None,
        "Tokenizer file, a sentencepiece .model or a tokenizer.json (default: the run's).",
    )
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_integer("tensor", None, "Tensor-parallel ways (default: the run's).")
    flags.mark_flag_as_required("from")


def cli(define_command_flags, main) -> None:
    """`python -m` entry of a command that reads a run: its own flags, the run flags, main."""
    from absl import app, logging

    define_flags()
    define_command_flags()
    logging.set_verbosity(logging.ERROR)  # orbax warns about every read-only checkpoint
    app.run(main)


# ---------------------------------------------------------------- to host, for converting


def restore_host(directory: epath.Path, step: int, target: dict) -> dict:
    """The params of `target`'s layout (NumPy arrays) from one checkpoint step, to host."""
    manager, _ = checkpoint_lib.open_read_only(directory, step)
    restore_args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
        return manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": target},
                    restore_args={"params": restore_args},
                    partial_restore=True,
                )
            ),
        )["state"]["params"]
    finally:
        manager.close()


def host_params(path: epath.PathLike) -> tuple[dict, dict, int]:
    """(the params as NumPy arrays, the checkpoint's JSON record, its step) of a run; of a
    LoRA run, its base model's params with the adapters merged in."""
    directory, step = locate(path)
    step, record = read_record(directory, step)
    if record is None:
        raise RunError(
            f"--from_run={str(path)!r}: no checkpoint there; give a run directory, "
            "its checkpoints/ or one step inside it"
        )
    m = param_layout.model_fields(record["config"]["model"])
    base = record.get("lora_base")
    if not base:
        return restore_host(directory, step, param_layout.host_arrays(m)), record, step
    t = record["config"]["train"]
    adapters = restore_host(
        directory, step, param_layout.host_adapters(m, int(t["lora_rank"]), t["lora_targets"])
    )
    base_step = pathlib.Path(base["path"]) / str(base["step"])
    if not (base_step / "state").is_dir():
        raise RunError(
            f"{str(path)!r} is a LoRA run whose adapters were trained beside "
            f"the base checkpoint {base_step}, which is not there; put it back"
        )
    params = lora_lib.merge(
        lora_lib.join(adapters, host_params(base_step)[0]),
        int(t["lora_rank"]),
        float(t["lora_alpha"]),
    )
    return params, record, step


# ---------------------------------------------------------------- where training starts


@dataclasses.dataclass
class Start:
    """Where a training run starts: the step done, the resumed checkpoint's record ({} when
    not resuming), the whole state, and with LoRA the base reference {"path", "step"}."""

    step: int
    record: dict
    state: dict
    lora_base: dict | None


def lora_settings(train_fields) -> tuple:
    """(lora_rank, lora_alpha, sorted lora_targets), or (0,) when LoRA is off."""
    rank = int(train_fields.get("lora_rank", 0))
    if not rank:
        return (0,)
    return rank, float(train_fields["lora_alpha"]), tuple(sorted(train_fields["lora_targets"]))


def check_same_lora_settings(train_fields, checkpoints) -> None:
    """A LoRA checkpoint holds adapters only, a plain one no adapters: resuming one with the
    other's settings is a config mistake, not an unreadable checkpoint to set aside."""
    from jaxlm.config import ConfigError

    latest = checkpoints.latest_step()
    if latest is None:
        return
    try:
        saved = checkpoint_lib.read_meta(checkpoints.manager, latest)["config"]["train"]
    except Exception:  # an unreadable checkpoint: restore_latest_readable reports it
        return
    ours, theirs = lora_settings(train_fields), lora_settings(saved)
    if ours != theirs:
        raise ConfigError(
            f"config.train.lora_rank, lora_alpha, lora_targets = {ours} but the checkpoints in "
            f"{checkpoints.directory} were trained with {theirs}; resume with the same LoRA "
            "settings, or start in another --workdir"
        )


def restore_lora_base(base: dict, abstract_base, step: int):
    """The frozen base params (abstract_base: their shapes and shardings) that the adapters of
    LoRA checkpoint `step` were trained beside; `base` is its reference {"path", "step"}."""
    path = pathlib.Path(base["path"]) / str(base["step"])
    try:
        return checkpoint_lib.restore_params(path, abstract_base)[0]
    except Exception as e:
        raise checkpoint_lib.CheckpointError(
            f"LoRA checkpoint {step} holds only adapters, trained beside the base model "
            f"{path}, which cannot be read ({type(e).__name__}: {e}); put that checkpoint back "
            "where it was to resume"
        ) from e


def initial_state(config, factory, checkpoints, say) -> Start:
    """Resumed from `checkpoints` (jaxlm.checkpoint.Checkpointer), else fine-tuned from
    checkpoint.init_from, else fresh; `factory` is jaxlm.step's StateFactory and `say`
    prints a line. With LoRA the state is the adapters beside the frozen base, whose
    checkpoint is read again on every resume."""
    from jaxlm.config import ConfigError

    t = config.train
    if t.lora_rank and not config.checkpoint.init_from:
        raise ConfigError(
            f"config.train.lora_rank={t.lora_rank} needs config.checkpoint.init_from: the base "
            "model the adapters train beside (a run's checkpoints/, or a model imported with "
            "python -m jaxlm.convert --from_hf); or set train.lora_rank=0"
        )
    check_same_lora_settings(t, checkpoints)  # before a mismatch reads as damage
    resumed = checkpoints.restore_latest_readable(factory.trained(factory.abstract))
    if resumed:
        step, trained, record = resumed
        say(f"resumed from {checkpoints.path(step)}")
        base = record.get("lora_base")
        if base:
            trained = factory.assemble(
                trained, restore_lora_base(base, factory.frozen_params(factory.abstract), step)
            )
            say(
                f"LoRA adapters beside the frozen base {base['path']} (step "
                f"{base['step']}), as when this run started"
            )
        return Start(step, record, trained, base)
    rng = jax.random.fold_in(jax.random.key(config.seed), 0)
    init_from = config.checkpoint.init_from
    if factory.lora:
        frozen, source_step = checkpoint_lib.restore_params(
            init_from, factory.frozen_params(factory.abstract)
        )
        base = {
            "path": str(checkpoint_lib.split_step(files.path(init_from))[0]),
            "step": source_step,
        }
        say(
            f"LoRA rank {t.lora_rank} on {','.join(t.lora_targets)} beside the frozen base "
            f"{base['path']} (step {source_step})"
        )
        return Start(0, {}, factory.assemble(factory.create_trained(rng), frozen), base)
    state = factory.create(rng)
    if init_from:
        params, source_step = checkpoint_lib.restore_params(init_from, factory.abstract["params"])
        state["params"] = params
        say(f"initialised params from {init_from} (step {source_step})")
    return Start(0, {}, state, None)


# ---------------------------------------------------------------- the run's own logs (#29)

GOODPUT = "goodput"  # RUN/goodput/process_<i>.jsonl: jaxlm.goodput's event log
WANDB_RUN = "wandb_run.json"  # RUN/wandb_run.json: the W&B run a resumed run continues


def goodput_log(run_dir: epath.PathLike, process_index: int = 0) -> epath.Path:
    return epath.Path(run_dir) / GOODPUT / f"process_{process_index}.jsonl"


def goodput_events(run_dir: epath.PathLike, process_index: int = 0) -> list[dict]:
    """One process's goodput events, all attempts, oldest first; a line torn by a kill is
    left out."""
    path = goodput_log(run_dir, process_index)
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def wandb_state(run_dir: epath.PathLike) -> dict:
    """{"id": the W&B run an earlier attempt logged to, "last_step": the last step it logged},
    or {} when none did."""
    path = epath.Path(run_dir) / WANDB_RUN
    return json.loads(path.read_text()) if path.exists() else {}
