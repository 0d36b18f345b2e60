"""Hugging Face Llama checkpoints in and out of jaxlm.

    python -m jaxlm.convert --from_hf=HF_DIR --to=RUN_DIR
    python -m jaxlm.train --config=RUN_DIR/config.py --workdir=runs/finetune
    python -m jaxlm.convert --from_run=runs/finetune --to_hf=OUT_DIR [--max_shard_size=5GB]
    python -m jaxlm.convert --from_run=runs/lora --merge_lora --to=RUN_DIR

A LoRA run's checkpoints hold adapters only: --merge_lora folds them into its base model's
weights (W + alpha / rank * A B) as a plain checkpoint, which trains, generates and exports
like any other (--to_hf from a LoRA run merges the same way on the fly).

Importing writes RUN_DIR/checkpoints (an orbax checkpoint that config.checkpoint.init_from
reads), RUN_DIR/config.py (the model's config, with data.tokenizer and init_from set) and the
tokenizer files, holding near one copy of the model in host memory. Exporting writes
config.json, generation_config.json, safetensors shards with their index, and the tokenizer
(jaxlm.hf_tokenizer: tokenizer.json too, so no protobuf is needed to load it), which
transformers' from_pretrained loads.

The tensors themselves (names, layout, safetensors files) are jaxlm.hf_weights'; config.json
is jaxlm.hf_config's. This module writes and reads the run directories around them.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

import jaxlm
from jaxlm import cli, files, hf_config, hf_tokenizer, hf_weights, mup, param_layout, platforms
from jaxlm import config as config_lib
from jaxlm import run as run_lib
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.hf_config import ConvertError


def _copy_tokenizer(hf_dir: pathlib.Path, run_dir: epath.Path) -> str:
    """Copy the tokenizer files; the one training uses: tokenizer.model (sentencepiece, as
    Llama 2 ships) if present, else tokenizer.json (Llama 3); "" if neither exists."""
    for name in hf_tokenizer.TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            epath.Path(hf_dir / name).copy(run_dir / name, overwrite=True)
    for name in ("tokenizer.model", "tokenizer.json"):
        if (run_dir / name).is_file():
            return str(run_dir / name)
    return ""


# The run a converted model's config.py starts a user from: a short fine-tune on modest rows.
FINETUNE = dict(seq_len=1024, global_batch_size=8, steps=1000, warmup_steps=20, lr=2e-5)


def _config_file(m: dict, dtype: str, tokenizer: str, init_from: str, source: str) -> str:
    model_lines = "".join(f"    m.{k} = {v!r}\n" for k, v in m.items())
    compute = "bfloat16" if dtype != "float32" else "float32"
    return (
        f'"""The model converted from {source} by python -m jaxlm.convert.\n\n'
        f"    python -m jaxlm.train --config=THIS_FILE --workdir=runs/NAME\n\n"
        "starts from its weights (checkpoint.init_from); set data and train fields for "
        'your run.\n"""\n\n'
        "from jaxlm.config import default_config\n\n\n"
        "def get_config():\n"
        "    config = default_config()\n"
        "    m = config.model\n"
        f"{model_lines}"
        f"    m.dtype = {compute!r}\n"
        '    m.param_dtype = "float32"  # the checkpoint is cast on restore\n'
        f"    config.data.tokenizer = {tokenizer!r}\n"
        f"    config.checkpoint.init_from = {init_from!r}\n"
        "    # A fine-tune's starting point, not default_config()'s pre-training run (256 rows of\n"
        "    # 4096 tokens). Set data.source to your data, and the batch (a multiple of the\n"
        "    # devices' count), row length and steps to your run; train prints the tokens per\n"
        "    # step and the memory per device at start.\n"
        f"    config.data.seq_len = {FINETUNE['seq_len']}\n"
        f"    config.train.global_batch_size = {FINETUNE['global_batch_size']}\n"
        f"    config.train.steps = {FINETUNE['steps']}\n"
        f"    config.train.warmup_steps = {FINETUNE['warmup_steps']}\n"
        f"    config.train.lr = {FINETUNE['lr']!r}\n"
        "    return config\n"
    )


def save_params(directory: epath.Path, params: dict, meta: dict) -> None:
    """Step 0 of a checkpoint directory laid out as jaxlm.checkpoint's ({"state": {"params"},
    "meta"}), which init_from reads. orbax by default deep-copies NumPy arrays before writing
    and compresses (both buffer a second copy of the model, measured); neither is done here,
    so saving adds next to nothing to the one copy already held."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False))
    )
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
        item_handlers={
            "state": ocp.PyTreeCheckpointHandler(
                use_compression=False, type_handler_registry=registry
            ),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )
    manager.save(
        0,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeSave({"params": params}), meta=ocp.args.JsonSave(meta)
        ),
    )
    manager.close()


def import_hf(hf_dir, run_dir, param_dtype: str | None = None) -> epath.Path:
    """Convert a Hugging Face Llama checkpoint (a local directory: safetensors reads local
    files) into RUN_DIR (local or gs://); return RUN_DIR/config.py."""
    hf_dir, run_dir = pathlib.Path(hf_dir), files.path(run_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConvertError(f"--from_hf={str(hf_dir)!r} has no config.json")
    m = hf_config.to_jaxlm(json.loads((hf_dir / "config.json").read_text()))
    dtype = param_dtype or hf_weights.source_dtype(hf_weights.weight_files(hf_dir))
    if run_lib.checkpoints_dir(run_dir).exists():
        raise ConvertError(f"--to={str(run_dir)!r} already has checkpoints/; choose a new dir")
    files.make_dir(run_dir, "--to")
    tokenizer = _copy_tokenizer(hf_dir, run_dir)
    if tokenizer:
        tokenizer_lib.load(tokenizer, "the tokenizer")  # fails now, not at training
    else:
        print(
            f"warning: {hf_dir} has no tokenizer.model or tokenizer.json; set "
            "config.data.tokenizer in RUN_DIR/config.py before training",
            file=sys.stderr,
        )

    config = config_lib.default_config()
    config.model.update(m)
    config.model.param_dtype = dtype
    config.data.tokenizer = tokenizer
    params = hf_weights.read_hf_params(hf_dir, m, dtype)
    save_params(
        run_lib.checkpoints_dir(run_dir),
        params,
        {
            "step": 0,
            "config": config.to_dict(),
            "jaxlm_version": jaxlm.__version__,
            "tokenizer": tokenizer,
            "converted_from": str(hf_dir.absolute()),
        },
    )
    del params
    config_path = run_dir / "config.py"
    config_path.write_text(
        _config_file(m, dtype, tokenizer, str(run_lib.checkpoints_dir(run_dir)), str(hf_dir))
    )
    return config_path


# --- jaxlm -> Hugging Face ----------------------------------------------------------------------


def read_run(run) -> tuple[dict, dict, int]:
    """(the params as NumPy arrays, the checkpoint's JSON record, its step) of a jaxlm run
    (jaxlm.run's `host_params`: a LoRA run's adapters merged into its base)."""
    try:
        return run_lib.host_params(run)
    except run_lib.RunError as e:
        raise ConvertError(str(e)) from None


def merge_lora(run, out_run) -> pathlib.Path:
    """Write a LoRA run's adapters merged into its base as a plain run; return its checkpoints/."""
    out = pathlib.Path(out_run).absolute()
    if run_lib.checkpoints_dir(out).exists():
        raise ConvertError(f"--to={str(out_run)!r} already has checkpoints/; choose a new dir")
    params, meta, step = read_run(run)
    if not meta.get("lora_base"):
        raise ConvertError(
            f"--merge_lora: {str(run)!r} is not a LoRA run (config.train."
            "lora_rank=0: its checkpoint holds whole weights); export it with "
            "--to_hf, or train from it with checkpoint.init_from"
        )
    config = copy.deepcopy(meta["config"])
    config["train"]["lora_rank"] = 0
    config["checkpoint"]["init_from"] = ""
    save_params(
        run_lib.checkpoints_dir(out),
        params,
        {
            "step": 0,
            "config": config,
            "jaxlm_version": jaxlm.__version__,
            "tokenizer": meta.get("tokenizer", ""),
            "merged_from": {
                "run": str(run_lib.locate(run)[0]),
                "step": step,
                "lora_base": meta["lora_base"],
            },
        },
    )
    return pathlib.Path(run_lib.checkpoints_dir(out))


def _clear_hf_dir(out: pathlib.Path, overwrite: bool) -> None:
    """--to_hf, like --to, refuses a directory that already holds a model; with --overwrite its
    weight files go first, so no shard of the old model survives beside the new ones."""
    old = sorted(out.glob("*.safetensors")) + sorted(out.glob("*.safetensors.index.json"))
    if not (old or (out / "config.json").exists()):
        return
    if not overwrite:
        raise ConvertError(
            f"--to_hf={str(out)!r} already holds a Hugging Face model; choose a new directory, "
            "or pass --overwrite to replace it"
        )
    for path in old:
        path.unlink()


def export_hf(
    run, out_dir, max_shard_size: str | int = "5GB", dtype: str | None = None, overwrite=False
) -> None:
    """Write a jaxlm run's checkpoint (local or gs://) as a Hugging Face LlamaForCausalLM
    directory (local: safetensors writes local files)."""
    out = pathlib.Path(files.make_dir(out_dir, "--to_hf"))  # before the long read
    _clear_hf_dir(out, overwrite)
    params, meta, step = read_run(run)
    m = param_layout.model_fields(meta["config"]["model"])
    dtype = dtype or m["param_dtype"]
    params = mup.fold_for_export(params, m)  # muP's multipliers into the weights
    n_files = hf_weights.write_hf_params(params, m, dtype, out, max_shard_size)
    bos, eos = hf_tokenizer.export(
        meta.get("tokenizer") or meta["config"].get("data", {}).get("tokenizer", ""), out
    )
    max_positions = (
        m["rope_original_max_position"] * m["rope_scaling_factor"]
        if m["rope_scaling"]
        else meta["config"].get("data", {}).get("seq_len", 4096)
    )
    config = hf_config.from_jaxlm(m, m["head_dim"], dtype, int(max_positions), bos, eos)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"wrote {out} from step {step}: {n_files} safetensors file(s)")


# --- command line -------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m jaxlm.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--from_hf", help="a Hugging Face Llama directory (config.json, safetensors)")
    p.add_argument("--to", help="with --from_hf or --merge_lora: the run directory to create")
    p.add_argument(
        "--param_dtype",
        choices=sorted(set(hf_weights.DTYPES.values())),
        help="with --from_hf: the checkpoint's dtype (default: the source's)",
    )
    p.add_argument("--from_run", help="a jaxlm run directory, its checkpoints/ or one step")
    p.add_argument("--to_hf", help="with --from_run: the Hugging Face directory to write")
    p.add_argument(
        "--merge_lora",
        action="store_true",
        help="with --from_run (a LoRA run) and --to: write its adapters merged into "
        "its base as a plain checkpoint",
    )
    p.add_argument("--max_shard_size", default="5GB", help="with --to_hf: e.g. 5GB, 500MB")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="with --to_hf: replace the model a directory already holds (--to never replaces "
        "a run's checkpoints)",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(set(hf_weights.DTYPES.values())),
        help="with --to_hf: the tensors' dtype (default: the params')",
    )
    args = p.parse_args(argv)
    args.max_shard_size = cli.size_in_bytes(args.max_shard_size, "--max_shard_size")
    if bool(args.from_hf) == bool(args.from_run):
        p.error("give --from_hf=DIR --to=RUN_DIR, or --from_run=RUN_DIR --to_hf=DIR")
    if args.from_hf and not args.to:
        p.error("--from_hf needs --to=RUN_DIR")
    if args.merge_lora and not (args.from_run and args.to and not args.to_hf):
        p.error("--merge_lora needs --from_run=LORA_RUN --to=RUN_DIR (and no --to_hf)")
    if args.from_run and not (args.to_hf or args.merge_lora):
        p.error("--from_run needs --to_hf=DIR, or --merge_lora --to=RUN_DIR")
    return args


def main(argv=None) -> None:
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.from_hf:
            config_path = import_hf(args.from_hf, args.to, args.param_dtype)
            print(
                f"wrote {run_lib.checkpoints_dir(args.to)} and {config_path}; train with "
                f"python -m jaxlm.train --config={config_path} --workdir=runs/NAME"
            )
        elif args.merge_lora:
            directory = merge_lora(args.from_run, args.to)
            print(
                f"wrote {directory}: the LoRA run merged into its base; export with "
                f"--from_run={args.to} --to_hf=DIR, or train from it with "
                f"checkpoint.init_from={directory}"
            )
        else:
            export_hf(args.from_run, args.to_hf, args.max_shard_size, args.dtype, args.overwrite)
    except (ConvertError, files.PathError) as e:
        sys.exit(f"convert error: {e}")


if __name__ == "__main__":
    main()
