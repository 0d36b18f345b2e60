"""Context parallelism (jaxlm.attention.context_parallel) on simulated devices: the balanced order,
attention against a float64 NumPy reference, and the whole model against one device."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import (
    assert_attention_matches_reference,
    assert_directional_derivatives,
    bfloat16_roundoff,
    factory_for,
    float32_roundoff,
    loss_terms,
    one_document_batch,
    packed_batch,
    ref_attention,
    small_config,
)

from benchmarks import ring_autodiff
from jaxlm import attention as attention_lib
from jaxlm import config as config_lib
from jaxlm import sharding as sharding_lib
from jaxlm import step as step_lib
from jaxlm.attention import balanced_order as balance_lib
from jaxlm.attention import context_parallel as cp
from jaxlm.attention import ring_pallas, ring_xla

LENGTH, HEAD_DIM = 64, 16


@pytest.mark.parametrize("shards", [1, 2, 4, 8])
def test_balanced_order_round_trips_and_gives_shard_i_chunks_i_and_mirror(shards):
    length = 4 * shards * 3
    x = np.arange(2 * length).reshape(2, length)
    balanced = np.asarray(balance_lib.balance(jnp.asarray(x), shards))
    np.testing.assert_array_equal(np.asarray(balance_lib.restore(jnp.asarray(balanced), shards)), x)
    np.testing.assert_array_equal(balanced[0], balance_lib.original_index(length, shards))
    c = length // (2 * shards)
    for i, shard in enumerate(np.split(balanced[0], shards)):
        want = np.concatenate(
            [
                np.arange(i * c, (i + 1) * c),
                np.arange((2 * shards - 1 - i) * c, (2 * shards - i) * c),
            ]
        )
        np.testing.assert_array_equal(shard, want)
    # Every shard gets the same number of causal (query, key) pairs.
    pairs = [
        int(np.sum(shard[:, None] >= np.arange(length)[None, :]))
        for shard in np.split(balanced[0], shards)
    ]
    assert len(set(pairs)) == 1


def _inputs(n_heads, n_kv, rows, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, LENGTH, n_heads, HEAD_DIM))
    k, v = (rng.standard_normal((batch, LENGTH, n_kv, HEAD_DIM)) for _ in range(2))
    if rows == "causal":
        return q, k, v, None
    # Documents of 23, 30 and 11 tokens: they cross the chunk and shard boundaries.
    packed = np.concatenate([np.full(n, i + 1) for i, n in enumerate((23, 30, 11))])
    return q, k, v, np.stack([packed, np.ones(LENGTH, np.int64)][:batch]).astype(np.int32)


def _sharded(fn, mesh_shape):
    """fn traced under a mesh of the given axis sizes and the default logical rules."""
    shape = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, **mesh_shape}
    mesh = sharding_lib.make_mesh(shape, jax.devices()[: int(np.prod(list(shape.values())))])

    def run(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.axis_rules()):
            return jax.jit(fn)(*args)

    return run


def _context_parallel(strategy, shards, block_impl="xla"):
    """Attention over rows in the original order: balance, attend over shards, restore.
    `block_impl` "splash": the TPU kernels (splash, the ring's Pallas blocks) interpreted."""

    def attend(q, k, v, seg):
        b = lambda a: None if a is None else balance_lib.balance(a, shards)  # noqa: E731
        return balance_lib.restore(
            cp.attention(b(q), b(k), b(v), b(seg), strategy, block_impl, splash_interpret=True),
            shards,
        )

    return attend


@pytest.mark.parametrize("strategy", cp.STRATEGIES)
@pytest.mark.parametrize(
    "mesh, group, rows",
    [
        (dict(sequence=2), 1, "packed"),
        (dict(sequence=4, tensor=2), 2, "causal"),
        (dict(sequence=8), 4, "packed"),
        (dict(sequence=2, data=2, tensor=2), 2, "packed"),
    ],
    ids=str,
)
def test_attention_matches_float64_reference(strategy, mesh, group, rows):
    """Values, and gradients as directional derivatives of the reference."""
    check_against_reference(_context_parallel(strategy, mesh["sequence"]), mesh, group, rows)


def check_against_reference(attend, mesh, group, rows):
    """`attend` (q, k, v, segment ids in the original order) under `mesh`, 2 kv heads of
    `group` query heads each, against the float64 reference: values and gradients."""
    n_kv = 2
    q, k, v, seg = _inputs(n_kv * group, n_kv, rows)
    segments = seg if seg is not None else np.ones((2, LENGTH), np.int32)
    weights = np.random.default_rng(1).standard_normal(q.shape)
    seg_arg = None if seg is None else jnp.asarray(seg)

    def objective(q, k, v):
        out = attend(q, k, v, seg_arg)
        return jnp.sum(out * weights), out

    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    (_, out), grads = _sharded(
        jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True), mesh
    )(*args)
    assert_attention_matches_reference(out, grads, q, k, v, segments, weights, 1e-5, 1e-4)


@pytest.mark.parametrize("tile", [4, 12])
def test_ring_in_query_tiles_matches_float64_reference(monkeypatch, tile):
    """The ring's blocks run a tile of queries at a time (here 4, or 8 where 12 does not
    divide a shard's 32 or 16 rows): the tiled blocks give the same values and gradients."""
    monkeypatch.setattr(ring_xla, "QUERY_TILE", tile)
    test_attention_matches_float64_reference("ring", dict(sequence=2), 2, "packed")


@pytest.mark.parametrize(
    "mesh, group, rows",
    [
        (dict(sequence=2), 2, "packed"),
        (dict(sequence=4, tensor=2), 1, "causal"),
    ],
    ids=str,
)
def test_ring_autodiff_backward_equals_custom_vjp(monkeypatch, mesh, group, rows):
    """The ring's backward by autodiff through the forward loop (query tiles rematerialized)
    gives the custom VJP's loss and gradients, and the reference's."""
    monkeypatch.setattr(ring_xla, "QUERY_TILE", 8)  # several tiles per block: the remat'ed loop
    q, k, v, seg = _inputs(2 * group, 2, rows)
    seg_arg = None if seg is None else jnp.asarray(seg)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
    attend = _context_parallel("ring", mesh["sequence"])
    run = _sharded(
        jax.value_and_grad(
            lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, seg_arg)) * weights), argnums=(0, 1, 2)
        ),
        mesh,
    )
    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    results = {"custom_vjp": run(*args)}
    with ring_autodiff.autodiff_backward():
        results["autodiff"] = run(*args)
    # Two float32 programs that sum in different orders: round-off (support.float32_roundoff)
    # of the loss's sum over q.size outputs, which bounds a gradient's shorter sums too.
    terms = q.size
    for a, b in zip(jax.tree.leaves(results["autodiff"]), jax.tree.leaves(results["custom_vjp"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=float32_roundoff(b, terms))
    segments = seg if seg is not None else np.ones((2, LENGTH), np.int32)
    w = np.asarray(weights, np.float64)
    assert_directional_derivatives(
        lambda q, k, v: sum(
            np.sum(np.sin(ref_attention(q[b], k[b], v[b], segments[b])) * w[b])
            for b in range(q.shape[0])
        ),
        (q, k, v),
        results["autodiff"][1],
        np.random.default_rng(3),
        tries=1,
        tol=1e-4,
    )


def test_bfloat16_strategies_stay_within_rounding_of_float32(monkeypatch):
    """In bfloat16 the strategies round at different points (the ring rescales float32
    partial sums); each stays within bfloat16 rounding of the float32 computation, the ring
    with its Pallas blocks (jaxlm.attention.ring_pallas, interpreted; 8-query tiles) too."""
    monkeypatch.setattr(ring_pallas, "BLOCK_Q", 8)
    q, k, v, seg = _inputs(4, 2, "packed")
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    seg = jnp.asarray(seg)

    def loss_and_grads(attend):
        return jax.value_and_grad(
            lambda q, k, v: jnp.sum(attend(q, k, v, seg).astype(jnp.float32) ** 2),
            argnums=(0, 1, 2),
        )

    exact = jax.jit(loss_and_grads(attention_lib.xla_attention))(
        *(a.astype(jnp.float32) for a in (q, k, v))
    )
    for strategy, block_impl in [(s, "xla") for s in cp.STRATEGIES] + [("ring", "splash")]:
        got = _sharded(
            loss_and_grads(_context_parallel(strategy, 4, block_impl)), dict(sequence=4)
        )(q, k, v)
        # bfloat16 round-off of the sums over the LENGTH keys (forward, dq) or queries (dk,
        # dv): 1e-2 * max|b| by hand before, which 0.47 of it reached on AMD EPYC.
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(exact)):
            bound = bfloat16_roundoff(b, LENGTH)
            np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=bound, rtol=0)


def test_splash_block_under_all_gather_matches_reference():
    """On TPU the all_gather strategy runs splash with a mask in the balanced order; here in
    Pallas' interpreter."""
    length = 256  # splash's key tiles are multiples of 128
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, length, 4, 64))
    k, v = (rng.standard_normal((1, length, 2, 64)) for _ in range(2))
    seg = np.concatenate([np.full(100, 1), np.full(156, 2)])[None].astype(np.int32)
    blocks = attention_lib.splash_block_sizes(length // 2, 128, 128)

    def attend(q, k, v, seg):
        b = lambda a: balance_lib.balance(a, 2)  # noqa: E731
        return balance_lib.restore(
            cp.attention(
                b(q), b(k), b(v), b(seg), "all_gather", "splash", blocks, splash_interpret=True
            ),
            2,
        )

    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    out, grads = _sharded(
        jax.value_and_grad(
            lambda q, k, v: (lambda o: (jnp.sum(jnp.sin(o)), o))(attend(q, k, v, jnp.asarray(seg))),
            argnums=(0, 1, 2),
            has_aux=True,
        ),
        dict(sequence=2, tensor=2),
    )(*args)
    np.testing.assert_allclose(
        out[1][0], ref_attention(q[0], k[0], v[0], seg[0]), atol=1e-5, rtol=1e-5
    )
    assert_directional_derivatives(
        lambda q, k, v: np.sum(np.sin(ref_attention(q[0], k[0], v[0], seg[0]))),
        (q, k, v),
        grads,
        np.random.default_rng(5),
        tries=1,
        tol=1e-4,
    )


def test_ring_never_gathers_keys_and_values():
    """The ring moves K/V with collective-permutes only: no all-gather in the program."""
    attend = _context_parallel("ring", 8)
    q, k, v, seg = (
        jnp.asarray(a, jnp.float32) if a.dtype.kind == "f" else jnp.asarray(a)
        for a in _inputs(4, 2, "packed")
    )
    shape = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 8}
    mesh = sharding_lib.make_mesh(shape, jax.devices())
    grad = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, seg) ** 2), argnums=(0, 1, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.axis_rules()):
        hlo = jax.jit(grad).lower(q, k, v).compile().as_text()
    assert re.search(r"collective-permute", hlo)
    assert not re.search(r"all-gather", hlo)


def _loss_and_grads(config, batch, devices):
    factory = factory_for(config, devices)
    state = factory.create(jax.random.key(0))
    with factory.context():

        def loss_fn(params, batch):
            total, count = step_lib.loss_sum_and_count(
                factory.model, params, batch, config.train.loss_chunks
            )
            return total / count

        placed = jax.device_put(batch, factory.batch_sharding)
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state["params"], placed)
    return float(loss), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize(
    "strategy, mesh, rows",
    [
        ("all_gather", dict(sequence=2, data=4), "packed"),
        ("all_gather", dict(sequence=4, tensor=2), "causal"),
        ("all_gather", dict(sequence=8), "packed"),
        ("ring", dict(sequence=2, data=2, tensor=2), "causal"),
        ("ring", dict(sequence=4, data=2), "packed"),
        ("ring", dict(sequence=8), "packed"),
    ],
    ids=str,
)
def test_whole_model_equals_one_device(strategy, mesh, rows):
    """Loss and every parameter gradient of the GQA model (4 heads, 2 kv heads) with the
    sequence split equal the single-device run in float32."""
    config = small_config(**mesh)
    config.model.context_parallel = strategy
    config.train.loss_chunks = 2
    batch = (packed_batch if rows == "packed" else one_document_batch)(config, 16)
    want_loss, want_grads = _loss_and_grads(small_config(), batch, jax.devices()[:1])
    loss, grads = _loss_and_grads(config, batch, None)
    # float32 round-off of the sums over tokens and vocabulary (support.loss_terms), which the
    # sequence split reorders; attention's own sum over keys is shorter.
    terms = loss_terms(config)
    np.testing.assert_allclose(loss, want_loss, rtol=0, atol=float32_roundoff(want_loss, terms))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=0, atol=float32_roundoff(want, terms))


def test_config_errors_name_the_field():
    config = small_config(sequence=8, fsdp=1)
    config.data.seq_len = 40  # 8 shards need rows divisible by 16
    with pytest.raises(config_lib.ConfigError, match=re.escape("data.seq_len")):
        config_lib.validate(config, 8)
    config = small_config(sequence=2, fsdp=4)
    config.model.context_parallel = "ringg"
    with pytest.raises(config_lib.ConfigError, match=re.escape("model.context_parallel")):
        config_lib.validate(config, 8)
    config = small_config(sequence=2, fsdp=4)
    config.data.seq_len, config.model.attention = 512, "splash"
    config.model.context_parallel = "ring"
    config_lib.validate(config, 8)  # the ring's Pallas blocks: shards of 256 tokens
    config.data.seq_len = 320  # shards of 160: not whole 128-token lanes
    with pytest.raises(config_lib.ConfigError, match=re.escape("data.seq_len")):
        config_lib.validate(config, 8)
