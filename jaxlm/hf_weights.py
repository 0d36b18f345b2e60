"""Hugging Face Llama tensors <-> jaxlm's parameter tree, in safetensors files.

Hugging Face stores a projection as W [out, in] applied as x @ W.T; jaxlm stores W.T with
the head axes split out ([d, heads, head_dim] for q). Both rotate the pairs (i, i + hd/2).
Reading fills preallocated stacked arrays one layer at a time, and writing builds each
tensor only when its shard is written, so host memory stays near one copy of the model.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlm import param_layout
from jaxlm.errors import ConvertError
from jaxlm.param_layout import get_path, set_path

DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
IGNORED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed by both

HF_NAMES = {  # jaxlm path -> Hugging Face name ({}: the layer)
    ("layers", "attn", "q"): "model.layers.{}.self_attn.q_proj.weight",
    ("layers", "attn", "k"): "model.layers.{}.self_attn.k_proj.weight",
    ("layers", "attn", "v"): "model.layers.{}.self_attn.v_proj.weight",
    ("layers", "attn", "o"): "model.layers.{}.self_attn.o_proj.weight",
    ("layers", "mlp", "gate"): "model.layers.{}.mlp.gate_proj.weight",
    ("layers", "mlp", "up"): "model.layers.{}.mlp.up_proj.weight",
    ("layers", "mlp", "down"): "model.layers.{}.mlp.down_proj.weight",
    ("layers", "attn_norm", "scale"): "model.layers.{}.input_layernorm.weight",
    ("layers", "mlp_norm", "scale"): "model.layers.{}.post_attention_layernorm.weight",
    ("embedding",): "model.embed_tokens.weight",
    ("final_norm", "scale"): "model.norm.weight",
    ("head",): "lm_head.weight",
}


def tensor_layout(m: dict) -> list[tuple[tuple, str, tuple, tuple, bool]]:
    """(jaxlm path, Hugging Face name with {} for the layer, jaxlm shape of one layer,
    Hugging Face shape, transposed) for every parameter of config.model fields `m`. A matmul
    kernel is stored transposed there, [out, in], its input and output axes flattened."""
    rows = []
    for path, shape, n_in in param_layout.params(m):
        hf_shape = (int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in]))) if n_in else shape
        rows.append((path, HF_NAMES[path], shape, hf_shape, bool(n_in)))
    return rows


def weight_files(hf_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it (one file, or an index's shards)."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: hf_dir / file for name, file in weight_map.items()}
    single = hf_dir / "model.safetensors"
    if not single.is_file():
        raise ConvertError(
            f"{hf_dir} has neither model.safetensors nor "
            "model.safetensors.index.json (only safetensors checkpoints convert)"
        )
    with safe_open(single, framework="np") as f:
        return {name: single for name in f.keys()}


def source_dtype(files: dict[str, pathlib.Path]) -> str:
    name = "model.embed_tokens.weight"
    if name not in files:
        raise ConvertError(f"the checkpoint has no tensor {name!r}")
    with safe_open(files[name], framework="np") as f:
        kind = f.get_slice(name).get_dtype()
    if kind not in DTYPES:
        raise ConvertError(f"tensor {name!r} is {kind}; jaxlm converts {sorted(DTYPES)}")
    return DTYPES[kind]


def _read_into(files: dict, names_and_targets: list, transposed: dict) -> None:
    """Read each (name, (target view, Hugging Face shape)) into its target. A file is opened
    per tensor: safetensors maps the file, and the pages a read touches stay resident until
    the file is closed, which would otherwise add up to a whole shard."""
    for name, (target, hf_shape) in names_and_targets:
        if name not in files:
            raise ConvertError(f"the checkpoint has no tensor {name!r}, which config.json implies")
        with safe_open(files[name], framework="np") as f:
            array = f.get_tensor(name)
        if tuple(array.shape) != tuple(hf_shape):
            raise ConvertError(
                f"tensor {name!r} has shape {tuple(array.shape)}; "
                f"config.json implies {tuple(hf_shape)}"
            )
        if transposed[name]:
            target.reshape(hf_shape[::-1])[...] = array.T
        else:
            target[...] = array
        del array


def read_hf_params(hf_dir: pathlib.Path, m: dict, dtype: str) -> dict:
    """jaxlm's parameter tree (NumPy arrays of `dtype`) from a Hugging Face checkpoint."""
    files = weight_files(hf_dir)
    layout = tensor_layout(m)
    params: dict = {}
    transposed = {}
    for path, name, shape, _, flip in layout:
        stacked = path[0] == "layers"
        set_path(params, path, np.empty(((m["n_layers"],) if stacked else ()) + shape, dtype))
        for i in range(m["n_layers"] if stacked else 1):
            transposed[name.format(i)] = flip
    for i in range(m["n_layers"]):
        _read_into(
            files,
            [
                (name.format(i), (get_path(params, path)[i], hf_shape))
                for path, name, _, hf_shape, _ in layout
                if path[0] == "layers"
            ],
            transposed,
        )
    _read_into(
        files,
        [
            (name, (get_path(params, path), hf_shape))
            for path, name, _, hf_shape, _ in layout
            if path[0] != "layers"
        ],
        transposed,
    )
    extra = [
        n
        for n in files
        if n not in transposed
        and not n.endswith(IGNORED)
        and not (m["tie_embeddings"] and n == "lm_head.weight")
    ]
    if extra:
        raise ConvertError(
            f"tensors {extra[:4]}{' ...' if len(extra) > 4 else ''} have no place "
            "in jaxlm's model (biases? another architecture?)"
        )
    return params


def hf_tensors(params: dict, m: dict, dtype: str):
    """(name, shape, nbytes, make) of each Hugging Face tensor; make() builds it then."""
    itemsize = np.dtype(dtype).itemsize
    for path, name, _, hf_shape, flip in tensor_layout(m):
        source = get_path(params, path)
        for i in range(m["n_layers"] if path[0] == "layers" else 1):
            one = source[i] if path[0] == "layers" else source

            def make(one=one, hf_shape=hf_shape, flip=flip):
                out = one.reshape(hf_shape[::-1]).T if flip else one
                return np.ascontiguousarray(out.astype(dtype, copy=False))

            yield name.format(i), hf_shape, int(np.prod(hf_shape)) * itemsize, make


def write_hf_params(params: dict, m: dict, dtype: str, out: pathlib.Path, max_shard_size) -> int:
    """Write `params` as Hugging Face tensors of `dtype` into safetensors files in `out`
    (shards of at most `max_shard_size`, with their index when there are several); return
    how many files were written."""
    from huggingface_hub import split_state_dict_into_shards_factory

    tensors = {name: (size, make) for name, _, size, make in hf_tensors(params, m, dtype)}
    split = split_state_dict_into_shards_factory(
        tensors,
        get_storage_size=lambda t: t[0],
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n][1]() for n in names}, out / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {
            "metadata": {"total_size": sum(size for size, _ in tensors.values())},
            "weight_map": split.tensor_to_filename,
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return len(split.filename_to_tensors)
