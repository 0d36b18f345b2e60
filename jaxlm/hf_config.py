"""Hugging Face `config.json` (LlamaConfig) <-> jaxlm's config.model fields.

Read as plain JSON, so converting needs no transformers install. Both spellings of rotary
settings are read: transformers 4's `rope_theta` / `rope_scaling` and 5's `rope_parameters`.
Whatever jaxlm's model cannot compute stops the conversion with a ConvertError naming the
field, rather than producing a model that silently computes something else.
"""

from __future__ import annotations

from jaxlm.errors import ConvertError


def _field(hf: dict, name: str, default=None):
    value = hf.get(name, default)
    if value is None:
        raise ConvertError(f"config.json has no {name!r}, which jaxlm needs")
    return value


def _check_unsupported(hf: dict) -> None:
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise ConvertError(
            f"config.json model_type={model_type!r}: only 'llama' (LlamaForCausalLM "
            "and its Llama-2/3 checkpoints) converts to jaxlm's model"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConvertError(f"config.json hidden_act={act!r}: jaxlm's MLP is SwiGLU ('silu')")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            raise ConvertError(
                f"config.json {name}={hf[name]!r}: jaxlm's projections have no biases"
            )
    for name in ("sliding_window", "layer_types"):
        if hf.get(name) and (name != "layer_types" or set(hf[name]) != {"full_attention"}):
            raise ConvertError(
                f"config.json {name}={hf[name]!r}: jaxlm attends over the whole "
                "causal context (no sliding window)"
            )


def _rope(hf: dict) -> dict:
    """jaxlm's rope fields from rope_parameters (transformers 5) or rope_theta/rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    where = "rope_parameters"
    if not params and hf.get("rope_scaling"):
        params, where = dict(hf["rope_scaling"]), "rope_scaling"
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    fields = {"rope_theta": float(theta), "rope_scaling": ""}
    if kind == "default":
        return fields
    if kind != "llama3":
        raise ConvertError(
            f"config.json {where}.rope_type={kind!r}: jaxlm implements 'default' "
            "and 'llama3' rotary embeddings"
        )
    for key in (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ):
        if key not in params:
            raise ConvertError(f"config.json {where} has no {key!r}, which 'llama3' needs")
    return {
        **fields,
        "rope_scaling": "llama3",
        "rope_scaling_factor": float(params["factor"]),
        "rope_low_freq_factor": float(params["low_freq_factor"]),
        "rope_high_freq_factor": float(params["high_freq_factor"]),
        "rope_original_max_position": int(params["original_max_position_embeddings"]),
    }


def to_jaxlm(hf: dict) -> dict:
    """config.model fields for a Hugging Face Llama config (a parsed config.json)."""
    _check_unsupported(hf)
    d, heads = int(_field(hf, "hidden_size")), int(_field(hf, "num_attention_heads"))
    return {
        "vocab_size": int(_field(hf, "vocab_size")),
        "d_model": d,
        "n_layers": int(_field(hf, "num_hidden_layers")),
        "n_heads": heads,
        "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or d // heads),
        "d_ff": int(_field(hf, "intermediate_size")),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        **_rope(hf),
    }


def from_jaxlm(m, head_dim: int, dtype: str, max_positions: int, bos_id=None, eos_id=None) -> dict:
    """A LlamaConfig config.json for config.model `m` (a ConfigDict or dict)."""
    rope = {"rope_type": "default", "rope_theta": float(m["rope_theta"])}
    if m["rope_scaling"]:
        rope.update(
            rope_type="llama3",
            factor=float(m["rope_scaling_factor"]),
            low_freq_factor=float(m["rope_low_freq_factor"]),
            high_freq_factor=float(m["rope_high_freq_factor"]),
            original_max_position_embeddings=int(m["rope_original_max_position"]),
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(m["vocab_size"]),
        "hidden_size": int(m["d_model"]),
        "intermediate_size": int(m["d_ff"]),
        "num_hidden_layers": int(m["n_layers"]),
        "num_attention_heads": int(m["n_heads"]),
        "num_key_value_heads": int(m["n_kv_heads"]),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "max_position_embeddings": int(max_positions),
        "rms_norm_eps": float(m["norm_eps"]),
        "rope_theta": rope["rope_theta"],  # transformers 4 reads these two, 5 rope_parameters
        "rope_scaling": rope if m["rope_scaling"] else None,
        "rope_parameters": rope,
        "tie_word_embeddings": bool(m["tie_embeddings"]),
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
