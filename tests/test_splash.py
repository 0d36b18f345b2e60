"""Splash attention (the Pallas TPU kernel, run here in Pallas' interpreter) against an
independent float64 NumPy reference, sharded over simulated devices, and inside the model."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import assert_attention_matches_reference, float32_roundoff, small_config

from jaxlm import attention as attention_lib
from jaxlm import config as config_lib
from jaxlm import kernel_choice
from jaxlm import sharding as sharding_lib
from jaxlm.model import ModelConfig, Transformer

LENGTH, HEAD_DIM, BLOCK = 256, 64, 128
PACKED_LENGTHS = (100, 90, 66)  # documents that cross the 128-token block boundaries


def _inputs(n_heads, n_kv, rows, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, LENGTH, n_heads, HEAD_DIM))
    k, v = (rng.standard_normal((batch, LENGTH, n_kv, HEAD_DIM)) for _ in range(2))
    if rows == "causal":
        return q, k, v, None, np.ones((batch, LENGTH), np.int32)
    packed = np.concatenate([np.full(n, i + 1) for i, n in enumerate(PACKED_LENGTHS)])
    segments = np.stack(
        [packed if b % 2 == 0 else np.ones(LENGTH, np.int64) for b in range(batch)]
    ).astype(np.int32)
    return q, k, v, segments, segments


def _splash(q, k, v, segments):
    return attention_lib.splash_attention(q, k, v, segments, block_q=BLOCK, block_kv=BLOCK)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("rows", ["causal", "packed"])
def test_values_and_derivatives_match_float64_reference(rows, group, dtype):
    """Values, and gradients as directional derivatives of the reference by central
    differences, along random directions of q, k and v together."""
    n_kv = 2
    q, k, v, seg_arg, segments = _inputs(n_kv * group, n_kv, rows)
    weights = np.random.default_rng(1).standard_normal(q.shape)
    seg = None if seg_arg is None else jnp.asarray(seg_arg)

    def objective(q, k, v):
        out = _splash(q, k, v, seg)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    cast = [jnp.asarray(a, dtype) for a in (q, k, v)]
    (_, out), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))(*cast)
    assert out.dtype == jnp.dtype(dtype) and all(g.dtype == jnp.dtype(dtype) for g in grads)
    # The reference sees the inputs the kernel saw (rounded to dtype), in float64.
    q, k, v = (np.asarray(a, np.float64) for a in cast)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert_attention_matches_reference(out, grads, q, k, v, segments, weights, tol, 10 * tol)


@pytest.mark.parametrize(
    "mesh", [dict(data=2, fsdp=2, tensor=2), dict(fsdp=4, tensor=2), dict(data=8)], ids=str
)
def test_sharded_over_devices_equals_unsharded(mesh):
    """One shard_map: rows over (data, fsdp), heads over tensor; each device its share."""
    q, k, v, seg, _ = (
        jnp.asarray(a) if a is not None else None for a in _inputs(4, 2, "packed", batch=8)
    )
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))

    def loss(q, k, v):
        return jnp.sum(jnp.sin(_splash(q, k, v, seg)))

    want_out = jax.jit(_splash)(q, k, v, seg)
    want_grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    shape = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, **mesh}
    device_mesh = sharding_lib.make_mesh(shape, jax.devices()[: int(np.prod(list(shape.values())))])
    with jax.set_mesh(device_mesh), nn.logical_axis_rules(sharding_lib.axis_rules()):
        out = jax.jit(_splash)(q, k, v, seg)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(out, want_out, atol=1e-6, rtol=1e-6)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


MODEL = dict(
    vocab_size=97,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    d_ff=48,
    init_std=0.2,
)


def _attention(impl):
    return attention_lib.Settings(impl=impl, splash_block_q=BLOCK, splash_block_kv=BLOCK)


def _forward_kernels(fn, *args) -> int:
    """How many splash forward kernels the traced program runs."""
    return len(re.findall(r"name=splash\w*_fwd", str(jax.make_jaxpr(fn)(*args))))


@pytest.mark.parametrize("remat", ["none", "full", "save_attention", "save_dots_and_attention"])
def test_model_with_splash_under_scan_and_remat_equals_xla_attention(remat):
    """The whole model (layers under nn.scan, remat policy) with splash equals it with the
    XLA path, logits and parameter gradients; the policies that save attention run the
    kernel's forward once per layer, "full" runs it again in the backward pass."""
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, MODEL["vocab_size"], (2, LENGTH)))
    _, _, _, segments, _ = _inputs(4, 2, "packed")  # row 0 packed, row 1 one document
    positions = jnp.asarray(
        np.stack([np.concatenate([np.arange(n) for n in PACKED_LENGTHS]), np.arange(LENGTH)])
    )
    segments = jnp.asarray(segments)
    splash_model = Transformer(ModelConfig(**MODEL, attention=_attention("splash"), remat=remat))
    xla_model = Transformer(ModelConfig(**MODEL, attention=_attention("xla")))
    params = nn.unbox(xla_model.init(jax.random.key(0), tokens))["params"]

    def loss(model, p):
        logits = model.apply({"params": p}, tokens, positions, segments)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0]), logits

    got = jax.jit(jax.value_and_grad(lambda p: loss(splash_model, p), has_aux=True))(params)
    want = jax.jit(jax.value_and_grad(lambda p: loss(xla_model, p), has_aux=True))(params)
    # Splash and XLA sum attention over up to LENGTH keys in different orders (128-key blocks
    # with online softmax vs one softmax); that error reaches a logit through the head's sum
    # over d_model, and a gradient the same way (its sum over tokens adds the tokens' errors,
    # which average out against the sum's own size). Max error / bound on the logits: 0.07 to
    # 0.10 here (AMD EPYC, YNNPACK or Eigen dots), 0.12 for the 1.27e-5 seen on a Xeon with AMX.
    terms = LENGTH * MODEL["d_model"]
    np.testing.assert_allclose(
        got[0][1], want[0][1], rtol=0, atol=float32_roundoff(want[0][1], terms)
    )
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(a, b, rtol=0, atol=float32_roundoff(b, terms))
    grad_fn = jax.grad(lambda p: loss(splash_model, p)[0])
    assert _forward_kernels(grad_fn, params) == (2 if remat == "full" else 1)


def test_remat_policy_keeps_the_forward_inside_shard_map():
    """Under a mesh the kernel sits inside shard_map; the policy still sees it."""
    tokens = jnp.zeros((4, LENGTH), jnp.int32)
    mesh = sharding_lib.make_mesh(
        {"data": 2, "fsdp": 1, "tensor": 2, "sequence": 1}, jax.devices()[:4]
    )
    counts = {}
    for remat in ("full", "save_attention"):
        model = Transformer(
            ModelConfig(**{**MODEL, "vocab_size": 96}, attention=_attention("splash"), remat=remat)
        )
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.axis_rules()):
            params = nn.unbox(model.init(jax.random.key(0), tokens))["params"]
            counts[remat] = _forward_kernels(
                jax.grad(lambda p, model=model: jnp.sum(model.apply({"params": p}, tokens))), params
            )
    assert counts == {"full": 2, "save_attention": 1}


@pytest.mark.parametrize(
    "changes, field",
    [
        (
            dict(mesh={"sequence": 4, "fsdp": -1}, model={"context_parallel": "ring"}),
            "data.seq_len",
        ),  # the ring's Pallas blocks: shards of 64 tokens are not 128 lanes
        (
            dict(mesh={"sequence": 4, "fsdp": -1}, model={"splash_block_q": 48}),
            "model.splash_block_q",
        ),  # divides the row (256), not a shard's 64 queries
        (dict(model={"splash_block_kv": 96}), "model.splash_block_kv"),
        (dict(model={"splash_block_q": 20}), "model.splash_block_q"),
    ],
)
def test_splash_settings_that_cannot_work_name_the_field(changes, field):
    config = small_config()
    config.data.seq_len = 256
    config.model.attention = "splash"
    for section, values in changes.items():
        config[section].update(values)
    with pytest.raises(config_lib.ConfigError, match=re.escape(field)):
        config_lib.validate(config, 8 if "mesh" in changes else 1)


def test_auto_picks_splash_on_tpu_where_it_applies():
    assert attention_lib.resolve("auto", "tpu", jnp.bfloat16) == "splash"
    assert attention_lib.resolve("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert attention_lib.resolve("auto", "gpu", jnp.float32) == "xla"
    assert attention_lib.resolve("auto", "cpu", jnp.bfloat16) == "xla"
    config = small_config()
    config.data.seq_len, config.model.attention = 256, "auto"
    one_device = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}
    assert kernel_choice.attention_impl(config, one_device, "tpu") == "splash"
    # A split sequence: splash per shard under all_gather; the ring's own Pallas blocks
    # (jaxlm.attention.ring_kernels) where its shards are whole 128-token lanes, else "auto" falls
    # back to XLA blocks and an explicit ask fails.
    split = {**one_device, "sequence": 2}
    assert kernel_choice.attention_impl(config, split, "tpu") == "splash"
    config.model.context_parallel = "ring"
    assert kernel_choice.attention_impl(config, split, "tpu") == "splash"
    split4 = {**one_device, "sequence": 4}
    assert kernel_choice.attention_impl(config, split4, "tpu") == "xla"
    config.model.attention = "splash"
    with pytest.raises(config_lib.ConfigError, match="data.seq_len"):
        kernel_choice.attention_impl(config, split4, "tpu")
