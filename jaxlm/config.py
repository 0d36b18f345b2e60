"""The config schema, its validation, and the values derived from it.

Every config file under `configs/` starts from `default_config()` and changes fields; no
other fields exist. `validate()` runs before anything is compiled and raises `ConfigError`
naming the field, the value and what would be valid; the checks of one part at a time live
in `jaxlm.config_checks`, `jaxlm.seq_len_schedule` and `jaxlm.kernel_choice`. Reading a config
from the command line (`--config=FILE`, its overrides, their errors) is `jaxlm.cli`'s job.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from jaxlm import attention as attention_lib
from jaxlm import batch_schedule, kernel_choice, seq_len_schedule
from jaxlm import model as model_lib
from jaxlm.config_checks import (
    check_eval_tasks,
    check_lora,
    check_mesh_fit,
    check_mup,
    check_observability,
    check_rope_scaling,
    require,
    resolve_mesh_shape,
)
from jaxlm.data import sft
from jaxlm.errors import ConfigError  # also jaxlm.config.ConfigError, as before

REMAT_POLICIES = ("none", *attention_lib.REMAT_POLICIES)
ATTENTION_IMPLS = attention_lib.IMPLEMENTATIONS
DTYPES = ("float32", "bfloat16", "float16")
NONFINITE_POLICIES = ("raise", "skip")


def default_config() -> ml_collections.ConfigDict:
    """Every field jaxlm knows, with its default. Config files override these."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 32000
    m.d_model = 4096
    m.n_layers = 32
    m.n_heads = 32
    m.n_kv_heads = 32
    m.head_dim = 0  # 0: d_model // n_heads
    m.d_ff = 11008
    m.rope_theta = 10000.0
    # "" (plain rotary embeddings) or "llama3" (Llama 3.1's long-context rope scaling: the
    # four fields below, as in Hugging Face's rope_scaling of rope_type "llama3")
    m.rope_scaling = ""
    m.rope_scaling_factor = 8.0
    m.rope_low_freq_factor = 1.0
    m.rope_high_freq_factor = 4.0
    m.rope_original_max_position = 8192
    m.norm_eps = 1e-5
    m.tie_embeddings = False
    m.init_std = 0.02
    m.dtype = "float32"  # compute dtype
    m.param_dtype = "float32"
    m.remat = "full"  # one of REMAT_POLICIES
    # one of ATTENTION_IMPLS; "auto": splash on TPU, cuDNN on GPU in 16-bit, else xla
    m.attention = "auto"
    # XLA attention's scores and softmax: float32 (True), or the compute dtype (False, MaxText's
    # default: the 7B step's TPU estimate is 10% shorter, benchmarks/results/NOTES.md).
    m.float32_attention_scores = True
    # Splash attention's tiles (query rows x keys), clipped to data.seq_len; keys a multiple of
    # 128, query rows of 8.
    m.splash_block_q = 512
    m.splash_block_kv = 512
    # Attention over a sequence split across devices (mesh.sequence > 1): "all_gather" (each
    # device gathers all keys and values) or "ring" (they travel round the devices and no device
    # holds them all); see jaxlm.attention.context_parallel.
    m.context_parallel = "all_gather"
    # Layers per iteration of the layer scan: 1 compiles fastest; n_layers unrolls the whole
    # stack (no loop and no stacked per-layer residual buffers; same parameters either way).
    m.scan_unroll = 1
    # --- muP (jaxlm.mup; README: Hyperparameter sweeps) ---
    # "sp" (standard) or "mup" (maximal update: hidden matrices' init std and Adam learning
    # rate scaled by mup_base_width / d_model, logits by the same, attention scores by
    # 1 / head_dim), so settings tuned at mup_base_width hold at larger d_model
    m.parametrization = "sp"
    m.mup_base_width = 0  # the d_model the hyperparameters were tuned at; 0: d_model

    c.data = d = ml_collections.ConfigDict()
    # "builtin" (the running Python's standard library, see jaxlm.data.corpus),
    # "arrayrecord:DIR" (made by python -m jaxlm.data.prepare), "tfds:NAME" or "sft:GLOB"
    # (chat / prompt-completion JSONL, trained on the answers only: jaxlm.data.sft)
    d.source = "builtin"
    d.seq_len = 4096
    # Short-to-long rows, ((start_step, seq_len), ...), e.g. ((0, 512), (2000, 2048), (5000, 4096)):
    # after start_step updates, rows of seq_len tokens. The last length is data.seq_len and each
    # divides it: a step cuts the same tokens (global_batch_size rows of data.seq_len) into more,
    # shorter rows, so tokens per step and the learning-rate schedule do not change. () = off.
    d.seq_len_schedule = ()
    # sentencepiece .model or tokenizer.json; "" = the prepared dataset's own, or (sft) that of
    # the run checkpoint.init_from names, or (builtin, tfds, sft) train one
    d.tokenizer = ""
    # SFT: how a conversation is laid out, one of jaxlm.data.sft.TEMPLATES (llama2, llama3,
    # chatml, plain); "" = as the prepared dataset was (needed for sft:GLOB)
    d.chat_template = ""
    # SFT: a conversation longer than seq_len + 1 tokens is "drop"ped or "truncate_left"ed
    # (its first tokens go); counted and printed at the start either way
    d.sft_overflow = "drop"
    d.text_key = "text"  # tfds: the feature holding the text
    d.val_fraction = 0.05  # builtin, tfds without a validation split: documents held out
    # validation rows: eval_batches * train.global_batch_size, the same rows whatever
    # train.grad_accum_steps (evaluated a microbatch at a time)
    d.eval_batches = 4
    d.num_threads = 2  # grain read threads
    d.prefetch = 4  # batches grain prepares ahead

    c.train = t = ml_collections.ConfigDict()
    t.steps = 1000  # optimizer updates
    t.global_batch_size = 256  # sequences per optimizer update, all microbatches together
    t.grad_accum_steps = 1
    t.lr = 3e-4
    t.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
    t.warmup_steps = 100
    t.weight_decay = 0.1
    t.b1 = 0.9
    t.b2 = 0.95
    t.eps = 1e-8
    t.clip_norm = 1.0
    # 1: the whole batch's float32 logits at once; n: the LM head and loss over n strided
    # slices of each row in a loop (jaxlm.loss), 1/n of the logits' memory, same FLOPs.
    t.loss_chunks = 1
    t.log_every = 10
    t.eval_every = 200
    # lm-evaluation-harness tasks at every eval_every, beside val_loss (jaxlm.train_eval; needs
    # the [eval] extra): harness task names or directories of task YAMLs; () is off.
    # eval_limit: items per task (0: all). Loaded at start: an unknown task stops the run there.
    t.eval_tasks = ()
    t.eval_limit = 0
    t.nonfinite = "raise"  # a non-finite loss or gradient: "raise" (stop) or "skip" the update
    t.max_skips_in_a_row = 10  # with "skip": stop after this many non-finite microbatches in a row
    # LoRA fine-tuning (0: off): low-rank adapters of this rank beside the lora_targets kernels
    # of the base model checkpoint.init_from names, scaled by lora_alpha / lora_rank. Only the
    # adapters are trained and checkpointed; the base is read from init_from (jaxlm.lora).
    t.lora_rank = 0
    t.lora_alpha = 16.0
    t.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")
    # Where the time goes (#29): profiles (jaxlm.profiling), Weights & Biases (jaxlm.wandb_log).
    # (first, last): a jax.profiler trace of steps first..last in WORKDIR/profile/<first>/;
    # () none. A step that compiles is left out (the trace starts after it).
    t.profile_steps = ()
    t.profile_every = 0  # > 0: the profile_steps window again every this many steps
    t.wandb_project = ""  # "": no W&B; else log there (pip install 'jaxlm[wandb]')
    t.wandb_entity = ""  # "": your default entity
    t.wandb_name = ""  # "": the workdir's name
    t.wandb_tags = ()
    t.wandb_mode = "online"  # "online", "offline" (`wandb sync` later) or "disabled"
    # Batch-size schedule (jaxlm.batch_schedule): ((tokens, global_batch_size), ...), e.g.
    # ((0, 64), (50_000_000, 128), (200_000_000, 256)): the global batch (rows of data.seq_len)
    # once that many tokens are consumed; the first is (0, train.global_batch_size), each later
    # one a multiple of it (the microbatch stays, more are accumulated). () = off. With one,
    # the run lasts total_tokens (train.steps is derived), warmup and cosine decay run in
    # tokens, and batch_lr_scaling ("none", "sqrt", "linear") scales the peak lr with the batch.
    # ("adaptive",) (--config.train.batch_schedule=adaptive): the batch doubles up to
    # max_global_batch_size where the noise scale passes it (jaxlm.adaptive_batch).
    t.batch_schedule = ()
    t.total_tokens = 0
    t.warmup_tokens = 0
    t.batch_lr_scaling = "none"
    t.max_global_batch_size = 0  # the adaptive ramp's ceiling: global_batch_size * 2^n
    t.adaptive_batch_ratio = 1.0
    t.adaptive_batch_interval = 20  # updates before the first decision and between two
    # True: the noise scale from each microbatch's two halves, so also with grad_accum_steps=1
    t.noise_scale_halves = False

    c.mesh = me = ml_collections.ConfigDict()
    me.data = 1
    me.fsdp = -1  # -1: the rest of the devices
    me.tensor = 1
    me.sequence = 1
    me.rules = ()  # ((logical_name, mesh_axes), ...) replacing entries of the default table

    c.checkpoint = ck = ml_collections.ConfigDict()
    ck.every = 1000
    ck.keep = 3  # the newest `keep` checkpoints ...
    ck.keep_every = 0  # ... plus every step that is a multiple of this (0: none)
    ck.init_from = ""  # a run's checkpoints/ dir (or one step in it): start from its params
    return c


@dataclasses.dataclass(frozen=True)
class Derived:
    """Values computed from a validated config, once."""

    head_dim: int
    mesh_shape: dict  # axis name -> size, -1 resolved
    data_parallel: int  # data * fsdp: how many ways a batch is split
    micro_batch_size: int  # sequences per jitted step (global batch / grad accum)
    per_device_batch_size: int
    n_params: int


def with_fields(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
    """A copy of `config` with each dotted field of `values` ("train.lr": 3e-3) set: a trial
    of a sweep, a candidate of the planner."""
    config = config.copy_and_resolve_references()
    for name, value in values.items():
        *sections, key = name.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[key] = value
    return config


def _unknown_fields(given, schema, prefix=""):
    for key in given.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            yield name
        elif isinstance(schema[key], ml_collections.ConfigDict):
            yield from _unknown_fields(given[key], schema[key], name + ".")


def count_params(m, head_dim: int) -> int:
    """Parameter count of the Transformer in jaxlm.model, from the config alone."""
    attn = m.d_model * head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)
    mlp = 3 * m.d_model * m.d_ff
    per_layer = attn + mlp + 2 * m.d_model
    embed = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    return m.n_layers * per_layer + embed + m.d_model


def validate(config: ml_collections.ConfigDict, n_devices: int) -> Derived:
    """Check `config` against the schema and the devices present; return derived values."""
    unknown = list(_unknown_fields(config, default_config()))
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {['config.' + u for u in unknown]}; the known fields "
            "are those of jaxlm.config.default_config() (check the spelling)"
        )
    m, t, d = config.model, config.train, config.data

    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
        require(int(m[field]) >= 1, f"model.{field}", m[field], "a positive integer")
    require(
        m.n_kv_heads <= m.n_heads and m.n_heads % m.n_kv_heads == 0,
        "model.n_kv_heads",
        m.n_kv_heads,
        f"must divide model.n_heads={m.n_heads} (grouped-query attention "
        f"shares each kv head among n_heads / n_kv_heads query heads)",
    )
    head_dim = m.head_dim
    if not head_dim:
        require(
            m.d_model % m.n_heads == 0,
            "model.n_heads",
            m.n_heads,
            f"must divide model.d_model={m.d_model}, or set model.head_dim explicitly",
        )
        head_dim = m.d_model // m.n_heads
    require(
        head_dim % 2 == 0, "model.head_dim", head_dim, "rotary embeddings need an even head_dim"
    )
    check_rope_scaling(m)
    check_mup(m)
    require(m.remat in REMAT_POLICIES, "model.remat", m.remat, f"one of {REMAT_POLICIES}")
    require(
        1 <= int(m.scan_unroll) <= m.n_layers,
        "model.scan_unroll",
        m.scan_unroll,
        f"between 1 and model.n_layers={m.n_layers}",
    )
    require(
        m.attention in ATTENTION_IMPLS, "model.attention", m.attention, f"one of {ATTENTION_IMPLS}"
    )
    require(
        m.float32_attention_scores or m.attention in ("xla", "auto"),
        "model.float32_attention_scores",
        m.float32_attention_scores,
        f"only XLA attention has a choice (model.attention={m.attention!r} keeps its "
        "own); set it True, or model.attention='xla'",
    )
    require(
        m.context_parallel in attention_lib.STRATEGIES,
        "model.context_parallel",
        m.context_parallel,
        f"one of {attention_lib.STRATEGIES}",
    )
    for field in ("dtype", "param_dtype"):
        require(m[field] in DTYPES, f"model.{field}", m[field], f"one of {DTYPES}")

    kind, _, where = d.source.partition(":")
    require(
        d.source == "builtin" or (kind in ("arrayrecord", "tfds", "sft") and where),
        "data.source",
        d.source,
        "'builtin', 'arrayrecord:DIR' (from python -m "
        "jaxlm.data.prepare), 'tfds:NAME' or 'sft:GLOB' (chat JSONL)",
    )
    require(
        d.chat_template in ("", *sft.TEMPLATES),
        "data.chat_template",
        d.chat_template,
        f"one of {', '.join(sft.TEMPLATES)} (or '' for a prepared dataset's own)",
    )
    require(
        kind != "sft" or d.chat_template,
        "data.chat_template",
        d.chat_template,
        f"data.source={d.source!r} needs one of {', '.join(sft.TEMPLATES)}",
    )
    require(
        d.sft_overflow in sft.OVERFLOW_POLICIES,
        "data.sft_overflow",
        d.sft_overflow,
        f"one of {sft.OVERFLOW_POLICIES}",
    )
    require(
        kind != "sft" or not d.seq_len_schedule,
        "data.seq_len_schedule",
        d.seq_len_schedule,
        "() with SFT data (conversations are packed whole into rows of data.seq_len)",
    )
    require(d.seq_len >= 2, "data.seq_len", d.seq_len, "at least 2 tokens")
    require(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "between 0 and 1")
    require(d.eval_batches >= 1, "data.eval_batches", d.eval_batches, "at least 1")
    require(t.steps >= 1, "train.steps", t.steps, "at least 1")
    require(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, "at least 1")
    require(
        t.loss_chunks >= 1 and d.seq_len % t.loss_chunks == 0,
        "train.loss_chunks",
        t.loss_chunks,
        f"a positive divisor of data.seq_len={d.seq_len}",
    )
    require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "zero or more")
    require(t.log_every >= 1, "train.log_every", t.log_every, "at least 1")
    require(t.eval_every >= 1, "train.eval_every", t.eval_every, "at least 1")
    require(config.checkpoint.every >= 1, "checkpoint.every", config.checkpoint.every, "at least 1")
    require(config.checkpoint.keep >= 1, "checkpoint.keep", config.checkpoint.keep, "at least 1")
    require(
        config.checkpoint.keep_every >= 0,
        "checkpoint.keep_every",
        config.checkpoint.keep_every,
        "zero (off) or a positive step interval",
    )
    require(
        t.nonfinite in NONFINITE_POLICIES,
        "train.nonfinite",
        t.nonfinite,
        f"one of {NONFINITE_POLICIES}",
    )
    require(
        t.max_skips_in_a_row >= 1, "train.max_skips_in_a_row", t.max_skips_in_a_row, "at least 1"
    )
    check_lora(t)
    check_observability(t)
    check_eval_tasks(t)
    batch_schedule.check(t)

    shape = resolve_mesh_shape(config.mesh, n_devices)
    check_mesh_fit(config, shape)
    seq_len_schedule.check(config, shape)
    if m.attention == "splash":
        kernel_choice.check_splash(config, shape)

    dp = shape["data"] * shape["fsdp"]
    require(
        t.global_batch_size % t.grad_accum_steps == 0,
        "train.global_batch_size",
        t.global_batch_size,
        f"must be divisible by train.grad_accum_steps={t.grad_accum_steps}",
    )
    micro = t.global_batch_size // t.grad_accum_steps
    require(
        micro % dp == 0,
        "train.global_batch_size",
        t.global_batch_size,
        f"each microbatch (global_batch_size / grad_accum_steps = {micro}) must be "
        f"divisible by the data-parallel degree mesh.data*mesh.fsdp = {dp}; "
        f"use a multiple of {dp * t.grad_accum_steps}",
    )
    require(
        not t.noise_scale_halves or micro % (2 * dp) == 0,
        "train.noise_scale_halves",
        t.noise_scale_halves,
        f"True only with microbatches of an even number of rows per device (global_batch_size "
        f"/ grad_accum_steps = {micro} over {dp} ways); use a multiple of "
        f"{2 * dp * t.grad_accum_steps}",
    )
    return Derived(
        head_dim=head_dim,
        mesh_shape=shape,
        data_parallel=dp,
        micro_batch_size=micro,
        per_device_batch_size=micro // dp,
        n_params=count_params(m, head_dim),
    )


def rope_scaling(m) -> tuple | None:
    """ModelConfig.rope_scaling from a validated config.model."""
    if not m.rope_scaling:
        return None
    return (
        float(m.rope_scaling_factor),
        float(m.rope_low_freq_factor),
        float(m.rope_high_freq_factor),
        int(m.rope_original_max_position),
    )


def model_config(
    config: ml_collections.ConfigDict, derived: Derived, platform: str | None = None
) -> model_lib.ModelConfig:
    """The model's own frozen config, from a validated ConfigDict, for `platform` (default:
    the default backend's): the `model.*` fields of ModelConfig's names, the attention ones
    in its `attention` settings, the platform's forms of the same arithmetic decided here."""
    m = config.model
    platform = platform or jax.default_backend()
    own = {
        f.name: m[f.name]
        for f in dataclasses.fields(model_lib.ModelConfig)
        if f.name in m and f.name != "attention"
    }
    attention = attention_lib.Settings(
        impl=m.attention,
        float32_scores=bool(m.float32_attention_scores),
        splash_block_q=int(m.splash_block_q),
        splash_block_kv=int(m.splash_block_kv),
        context_parallel=m.context_parallel,
        platform=platform,
    )
    return model_lib.ModelConfig(
        **{
            **own,
            "head_dim": derived.head_dim,
            "rope_scaling": rope_scaling(m),
            "dtype": jnp.dtype(m.dtype),
            "param_dtype": jnp.dtype(m.param_dtype),
            "scan_unroll": int(m.scan_unroll),
            "attention": attention,
            "rotary_table": platform != "tpu",  # inline sin/cos on TPU (model.apply_rotary)
            "lora_rank": int(config.train.lora_rank),
            "lora_alpha": float(config.train.lora_alpha),
            "lora_targets": tuple(config.train.lora_targets),
        }
    )
