"""Vocab-parallel cross-entropy (jaxlm.loss under a mesh with tensor > 1) against a float64
NumPy reference, its compiled program (no whole logits), and the train step across meshes."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from support import (
    assert_directional_derivatives,
    factory_for,
    float32_roundoff,
    loss_terms,
    packed_batch,
    small_config,
)

from jaxlm import loss as loss_lib
from jaxlm import sharding as sharding_lib
from jaxlm import step as step_lib

MESHES = {
    "tensor2": dict(tensor=2),
    "tensor4": dict(tensor=4),
    "tensor8": dict(tensor=8),
    "data2_tensor2_sequence2": dict(data=2, tensor=2, sequence=2),
    "fsdp2_tensor4": dict(fsdp=2, tensor=4),
}


def _mesh(**shape):
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, **shape}
    return sharding_lib.make_mesh(sizes, jax.devices()[: int(np.prod(list(sizes.values())))])


def _numpy_loss_and_grads(x, head, targets, weights):
    """Float64 loss sum and its analytic gradients: (softmax - one_hot) * weight."""
    logits = np.einsum("bld,dv->blv", x, head)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -np.sum(np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * weights)
    grad_logits = np.exp(log_probs)
    np.put_along_axis(
        grad_logits,
        targets[..., None],
        np.take_along_axis(grad_logits, targets[..., None], -1) - 1,
        axis=-1,
    )
    grad_logits *= weights[..., None]
    return (
        loss,
        np.einsum("blv,dv->bld", grad_logits, head),
        np.einsum("bld,blv->dv", x, grad_logits),
    )


def _problem(seed=0, b=8, l=16, d=16, v=64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, l, d))
    head = rng.standard_normal((d, v))
    targets = rng.integers(0, v, (b, l))
    targets[0, :2] = 0, v - 1  # the first and last ids: the edge shards hold them
    weights = (rng.random((b, l)) > 0.25).astype(np.float64)  # some positions dropped
    return x, head, targets, weights


def _on_mesh(mesh, x, head, targets, weights, chunks):
    """jaxlm's loss and gradients, inputs placed as the train step places them."""
    fn = jax.jit(jax.value_and_grad(loss_lib.cross_entropy_sum, argnums=(0, 1)), static_argnums=4)
    if mesh is None:
        return fn(x, head, targets, weights, chunks)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.DEFAULT_RULES):
        assert loss_lib.vocab_axes() == ("tensor",)
        rows = NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length")))
        head_sharding = NamedSharding(mesh, nn.logical_to_mesh_axes(("embed", "vocab")))
        return fn(
            jax.device_put(x, rows),
            jax.device_put(head, head_sharding),
            jax.device_put(targets, rows),
            jax.device_put(weights, rows),
            chunks,
        )


def _assert_close(got, expected, tol=1e-5):
    got = np.asarray(got, np.float64)
    assert np.abs(got - expected).max() <= tol * np.abs(expected).max()


def test_the_reference_gradients_are_the_derivatives_of_the_reference_loss():
    x, head, targets, weights = _problem(seed=1, b=2, l=4, d=8, v=12)
    _, grad_x, grad_head = _numpy_loss_and_grads(x, head, targets, weights)
    assert_directional_derivatives(
        lambda x, h: _numpy_loss_and_grads(x, h, targets, weights)[0],
        [x, head],
        [grad_x, grad_head],
        np.random.default_rng(2),
        tries=3,
        tol=1e-6,
    )


@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("name", list(MESHES))
def test_loss_and_gradients_match_float64_numpy(name, chunks):
    x, head, targets, weights = _problem()
    expected = _numpy_loss_and_grads(x, head, targets, weights)
    args = (
        jnp.asarray(x, jnp.float32),
        jnp.asarray(head, jnp.float32),
        jnp.asarray(targets, jnp.int32),
        jnp.asarray(weights, jnp.float32),
    )
    loss, (grad_x, grad_head) = _on_mesh(_mesh(**MESHES[name]), *args, chunks)
    assert abs(float(loss) - expected[0]) <= 1e-5 * abs(expected[0])
    _assert_close(grad_x, expected[1])
    _assert_close(grad_head, expected[2])
    assert np.all(np.asarray(grad_x)[weights == 0] == 0)
    # The same as without a mesh (jaxlm.loss unsharded), up to float32 round-off of the sums
    # over tokens and vocabulary that the shards split differently.
    unsharded, (unsharded_x, unsharded_head) = _on_mesh(None, *args, chunks)
    terms = x.shape[0] * x.shape[1] * head.shape[1]
    assert abs(float(loss) - float(unsharded)) <= float32_roundoff(unsharded, terms)
    for got, want in ((grad_x, unsharded_x), (grad_head, unsharded_head)):
        assert np.abs(np.asarray(got) - want).max() <= float32_roundoff(want, terms)


def test_bfloat16_inputs_give_float32_loss_and_bfloat16_gradients():
    x, head, targets, weights = _problem(seed=3)
    low = [jnp.asarray(a, jnp.bfloat16) for a in (x, head)]
    loss, (grad_x, grad_head) = _on_mesh(
        _mesh(tensor=4), *low, jnp.asarray(targets), jnp.asarray(weights, jnp.float32), 2
    )
    assert loss.dtype == jnp.float32 and grad_x.dtype == grad_head.dtype == jnp.bfloat16
    expected = _numpy_loss_and_grads(*(np.asarray(a, np.float64) for a in low), targets, weights)
    assert abs(float(loss) - expected[0]) <= 1e-3 * abs(expected[0])
    _assert_close(grad_head, expected[2], tol=2e-2)


def test_a_sequence_split_the_slices_do_not_divide_is_refused():
    x, head, targets, weights = _problem()
    with pytest.raises(ValueError, match="loss_chunks"):  # 16 positions, 8 per device, 16 chunks
        _on_mesh(
            _mesh(tensor=2, sequence=2),
            x.astype(np.float32),
            head.astype(np.float32),
            targets,
            weights.astype(np.float32),
            16,
        )


def _all_gather_shapes(hlo: str) -> list:
    """The shapes (dims) in the result types of every all-gather in compiled HLO text."""
    types = re.findall(r"= (.*?) all-gather(?:-start)?\(", hlo)
    return [
        tuple(int(n) for n in dims.split(",") if n)
        for t in types
        for dims in re.findall(r"\[([0-9,]*)\]", t)
    ]


@pytest.mark.parametrize("chunks", [1, 4])
def test_no_device_gathers_or_holds_whole_logits(chunks):
    """Compiled for tensor=8 (with fsdp=1 nothing needs gathering at all): no all-gather makes
    anything vocab-sized, and the temporaries stay well below whole float32 logits."""
    b, l, d, v = 8, 128, 32, 4096
    mesh = _mesh(tensor=8)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.DEFAULT_RULES):
        rows = NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length")))
        head = NamedSharding(mesh, nn.logical_to_mesh_axes(("embed", "vocab")))
        args = (
            jax.ShapeDtypeStruct((b, l, d), jnp.float32, sharding=rows),
            jax.ShapeDtypeStruct((d, v), jnp.float32, sharding=head),
            jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((b, l), jnp.float32, sharding=rows),
        )
        compiled = (
            jax.jit(
                jax.value_and_grad(loss_lib.cross_entropy_sum, argnums=(0, 1)), static_argnums=4
            )
            .lower(*args, chunks)
            .compile()
        )
    text = compiled.as_text()
    assert "all-reduce" in text  # the softmax statistics are combined over the shards
    assert not [s for s in _all_gather_shapes(text) if v in s], _all_gather_shapes(text)
    whole_logits = b * l * v * 4
    # Measured: 1/4 of it with chunks=1 (the logits' and their gradient's shards), less in slices.
    assert compiled.memory_analysis().temp_size_in_bytes < whole_logits / 2


def test_all_gather_shapes_finds_a_vocab_sized_gather():
    """The HLO check above can fail: a gathered head shows up."""
    mesh = _mesh(tensor=8)
    head = jax.device_put(
        jnp.zeros((32, 4096)), NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor"))
    )
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    text = jax.jit(lambda h: h * 2, out_shardings=replicated).lower(head).compile().as_text()
    assert (32, 4096) in _all_gather_shapes(text)


# The whole model: one train-step loss and gradients, vocab-parallel vs one device.

STEP_MESHES = [
    (dict(tensor=2), 1),
    (dict(tensor=4), 1),
    (dict(tensor=4), 4),
    (dict(data=2, tensor=2, sequence=2), 2),
    (dict(fsdp=2, tensor=4), 1),
]


def _step_config(**mesh):
    config = small_config(**mesh)
    config.model.n_kv_heads = 4  # tensor=4 splits kv heads too
    return config


def _loss_and_grads(factory, params, batch):
    def loss_fn(p, b):
        total, count = step_lib.loss_sum_and_count(factory.model, p, b, factory.loss_chunks)
        return total / count

    params_sharding = factory.shardings["params"]
    fn = jax.jit(
        jax.value_and_grad(loss_fn),
        in_shardings=(params_sharding, factory.batch_sharding),
        out_shardings=(None, params_sharding),
    )
    with factory.context():
        batch = sharding_lib.global_batch(batch, factory.batch_sharding)
        jaxpr = str(jax.make_jaxpr(fn)(params, batch))
        return fn(params, batch), jaxpr


@pytest.fixture(scope="module")
def one_device():
    """Whole float32 logits and optax's cross-entropy on one device: the reference."""
    config = _step_config()
    factory = factory_for(config, jax.devices()[:1])
    params = factory.create(jax.random.key(0))["params"]
    batch = packed_batch(config, config.train.global_batch_size)
    (loss, grads), jaxpr = _loss_and_grads(factory, params, batch)
    assert "shard_map" not in jaxpr
    return jax.device_get(params), batch, float(loss), jax.device_get(grads)


@pytest.mark.parametrize("mesh,chunks", STEP_MESHES)
def test_model_loss_and_gradients_match_one_device(mesh, chunks, one_device):
    params, batch, ref_loss, ref_grads = one_device
    config = _step_config(**mesh)
    config.train.loss_chunks = chunks
    factory = factory_for(config, jax.devices()[: int(np.prod(list(mesh.values())))])
    (loss, grads), jaxpr = _loss_and_grads(
        factory, jax.device_put(params, factory.shardings["params"]), batch
    )
    assert "shard_map" in jaxpr  # the vocab-parallel loss ran
    # float32 round-off of the sums over tokens and vocabulary, which the meshes split.
    terms = loss_terms(config)
    assert abs(float(loss) - ref_loss) <= float32_roundoff(ref_loss, terms)
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(jax.device_get(grads)), jax.tree.leaves(ref_grads)
    ):
        assert np.abs(g - r).max() <= float32_roundoff(r, terms), jax.tree_util.keystr(path)


def test_train_and_eval_steps_on_tensor4_match_one_device(one_device):
    _, batch, ref_loss, ref_grads = one_device
    factory = factory_for(_step_config(tensor=4), jax.devices()[:4])
    state = factory.create(jax.random.key(0))  # one_device's values (see tests/test_sharding.py)
    with factory.context():
        global_batch = sharding_lib.global_batch(batch, factory.batch_sharding)
        eval_sum, count = step_lib.make_eval_step(factory)(state["params"], global_batch)
        _, metrics = step_lib.make_train_step(factory)(state, global_batch)
    ref_norm = np.sqrt(
        sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(ref_grads))
    )
    terms = loss_terms(_step_config())  # float32 round-off, as in the test above
    assert abs(float(eval_sum) / float(count) - ref_loss) <= float32_roundoff(ref_loss, terms)
    assert abs(float(metrics["loss"]) - ref_loss) <= float32_roundoff(ref_loss, terms)
    assert abs(float(metrics["grad_norm"]) - ref_norm) <= float32_roundoff(ref_norm, terms)
