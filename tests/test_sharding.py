"""One step gives the same loss and gradients on every mesh; weights land where the rules say."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from support import factory_for, float32_roundoff, loss_terms, packed_batch, small_config

from jaxlm import sharding as sharding_lib
from jaxlm import step as step_lib

MESHES = {
    "one_device": dict(data=1, fsdp=1, tensor=1),
    "data8": dict(data=8, fsdp=1, tensor=1),
    "fsdp8": dict(data=1, fsdp=8, tensor=1),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


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
        return fn(params, sharding_lib.global_batch(batch, factory.batch_sharding))


@pytest.fixture(scope="module")
def reference():
    config = small_config(**MESHES["one_device"])
    factory = factory_for(config, jax.devices()[:1])
    state = factory.create(jax.random.key(0))
    batch = packed_batch(config, config.train.global_batch_size)
    loss, grads = _loss_and_grads(factory, state["params"], batch)
    return jax.device_get(state["params"]), batch, float(loss), jax.device_get(grads)


def _assert_matches_reference(loss, grads, ref_loss, ref_grads):
    # Meshes split the sums over tokens and vocabulary differently: float32 round-off of
    # those sums bounds the difference (support.loss_terms); a wrong shard is order 1e-2.
    terms = loss_terms(small_config())
    assert abs(float(loss) - ref_loss) <= float32_roundoff(ref_loss, terms)
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(jax.device_get(grads)), jax.tree.leaves(ref_grads)
    ):
        assert np.abs(g - r).max() <= float32_roundoff(r, terms), jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", list(MESHES))
def test_loss_and_gradients_agree_across_meshes(name, reference):
    params, batch, ref_loss, ref_grads = reference
    config = small_config(**MESHES[name])
    devices = jax.devices()[:1] if name == "one_device" else jax.devices()
    factory = factory_for(config, devices)
    # Fresh init on this mesh gives the same values (partitionable RNG) ...
    created = jax.device_get(factory.create(jax.random.key(0))["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), created, params)
    # ... and the same loss and gradients.
    params_here = jax.device_put(params, factory.shardings["params"])
    _assert_matches_reference(*_loss_and_grads(factory, params_here, batch), ref_loss, ref_grads)


@pytest.mark.parametrize(
    "mesh",
    [
        dict(data=1, fsdp=1, tensor=1),
        dict(data=2, fsdp=2, tensor=2),
        dict(data=1, fsdp=2, tensor=2, sequence=2),
    ],
)
def test_loss_in_slices_gives_the_same_loss_and_gradients(mesh, reference):
    """train.loss_chunks=4 (jaxlm.loss) against the whole-logits reference, on sharded
    meshes too: vocab split over tensor, rows over sequence."""
    params, batch, ref_loss, ref_grads = reference
    config = small_config(**mesh)
    config.train.loss_chunks = 4
    factory = factory_for(config, jax.devices()[: int(np.prod(list(mesh.values())))])
    assert factory.loss_chunks == 4  # what make_train_step / make_eval_step will use
    params_here = jax.device_put(params, factory.shardings["params"])
    _assert_matches_reference(*_loss_and_grads(factory, params_here, batch), ref_loss, ref_grads)


def test_train_step_agrees_across_meshes(reference):
    params, batch, ref_loss, _ = reference
    losses = []
    for name in ("one_device", "data2_fsdp2_tensor2"):
        config = small_config(**MESHES[name])
        factory = factory_for(config, jax.devices()[:1] if name == "one_device" else jax.devices())
        state = factory.create(jax.random.key(0))
        step = step_lib.make_train_step(factory)
        with factory.context():
            state, metrics = step(state, sharding_lib.global_batch(batch, factory.batch_sharding))
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    # Loss and gradient norm carry the round-off of the sums behind them (see above).
    terms = loss_terms(small_config())
    for got, want in zip(losses[1], losses[0]):
        assert abs(got - want) <= float32_roundoff(want, terms)
    assert abs(losses[0][0] - ref_loss) <= float32_roundoff(ref_loss, terms)


def test_weights_are_sharded_as_the_rules_say():
    factory = factory_for(small_config(**MESHES["data2_fsdp2_tensor2"]))
    state = factory.create(jax.random.key(0))
    params = state["params"]
    embed = ("fsdp", "sequence")  # weights are split over the sequence shards too
    expected = {
        ("embedding",): P("tensor", embed),
        ("head",): P(embed, "tensor"),
        ("layers", "attn", "q"): P(None, embed, "tensor", None),
        ("layers", "attn", "k"): P(None, embed, "tensor", None),
        ("layers", "attn", "o"): P(None, "tensor", None, embed),
        ("layers", "mlp", "gate"): P(None, embed, "tensor"),
        ("layers", "mlp", "down"): P(None, "tensor", embed),
        ("layers", "attn_norm", "scale"): P(None, None),
    }
    for path, spec in expected.items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
        # Each device really holds only its shard.
        shard = leaf.addressable_shards[0].data
        mesh_shape = leaf.sharding.mesh.shape
        split = [
            int(np.prod([mesh_shape[n] for n in ((a,) if isinstance(a, str) else a)])) if a else 1
            for a in spec
        ]
        assert shard.shape == tuple(
            n // s for n, s in zip(leaf.shape, split + [1] * (leaf.ndim - len(split)))
        )
    # Adam's moments follow their parameters.
    adam = [
        s
        for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")
    ]
    assert adam, "no Adam state found"
    assert adam[0].mu["layers"]["attn"]["q"].sharding.spec == P(None, embed, "tensor", None)
