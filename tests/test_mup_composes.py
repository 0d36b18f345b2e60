"""muP with the rest of jaxlm: sharded meshes, the sequence split (all-gather and ring), splash,
LoRA and resuming from a checkpoint each compute what the one-device XLA muP model does."""

import jax
import numpy as np
import pytest
from support import (
    factory_for,
    float32_roundoff,
    loss_terms,
    packed_batch,
    short_run_config,
    small_config,
)
from test_fault_tolerance import assert_ends_as_unbroken

from jaxlm import mup, optim
from jaxlm import step as step_lib
from jaxlm import train as train_lib

ONE_DEVICE = jax.devices()[:1]


def mup_config(seq_len=32, **mesh):
    """small_config under muP at half its base width (ratio 0.5), so every multiplier is
    something other than 1."""
    config = small_config(**mesh)
    config.model.parametrization, config.model.mup_base_width = "mup", 32  # d_model 64
    config.data.seq_len = seq_len
    return config


def _loss_and_grads(config, params, batch, devices):
    """Mean loss and its gradients of `params` (host arrays) under `config`'s mesh and kernels."""
    factory = factory_for(config, devices)
    assert mup.ratio_of(factory.model.cfg) == 0.5

    def loss_fn(p, b):
        total, count = step_lib.loss_sum_and_count(factory.model, p, b, config.train.loss_chunks)
        return total / count

    with factory.context():
        placed = jax.device_put(params, factory.shardings["params"])
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(
            placed, jax.device_put(batch, factory.batch_sharding)
        )
    return float(loss), jax.device_get(grads)


PATHS = {  # name -> (config changes, devices)
    "data2_fsdp2_tensor2": (dict(mesh=dict(data=2, fsdp=2, tensor=2)), None),
    "fsdp8_loss_chunks": (dict(mesh=dict(fsdp=8), loss_chunks=4), None),
    "all_gather_sequence2": (dict(mesh=dict(sequence=2, data=4), cp="all_gather"), None),
    "ring_sequence4": (dict(mesh=dict(sequence=4, data=2), cp="ring"), None),
    "splash": (dict(mesh={}, attention="splash", seq_len=128), ONE_DEVICE),
    "lora_data2_fsdp2_tensor2": (dict(mesh=dict(data=2, fsdp=2, tensor=2), lora=True), None),
}


def _path_config(changes):
    config = mup_config(changes.get("seq_len", 32), **changes["mesh"])
    config.train.loss_chunks = changes.get("loss_chunks", 1)
    if "cp" in changes:
        config.model.context_parallel = changes["cp"]
    if "attention" in changes:
        config.model.attention = changes["attention"]
        config.model.splash_block_q = config.model.splash_block_kv = 128
    if changes.get("lora"):
        config.train.lora_rank, config.train.lora_alpha = 4, 8.0
    return config


@pytest.mark.parametrize("name", list(PATHS))
def test_mup_loss_and_gradients_equal_the_one_device_xla_model(name):
    changes, devices = PATHS[name]
    config = _path_config(changes)
    reference = _path_config({**changes, "mesh": {}})
    reference.model.attention = "xla"
    reference.model.context_parallel = small_config().model.context_parallel
    reference.train.loss_chunks = 1
    factory = factory_for(reference, ONE_DEVICE)
    params = jax.device_get(factory.create(jax.random.key(0))["params"])
    if changes.get("lora"):  # B starts at zero: make it count
        rng = np.random.default_rng(0)
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: (
                0.3 * rng.standard_normal(x.shape).astype(x.dtype)
                if p[-1].key.endswith("_lora_b")
                else x
            ),
            params,
        )
    batch = packed_batch(config, config.train.global_batch_size)
    want_loss, want_grads = _loss_and_grads(reference, params, batch, ONE_DEVICE)
    loss, grads = _loss_and_grads(config, params, batch, devices)
    # Meshes, kernels and the sequence split sum the same terms in other orders: float32
    # round-off of those sums bounds the difference (a missing multiplier is order 1e-1).
    terms = loss_terms(config)
    assert abs(loss - want_loss) <= float32_roundoff(want_loss, terms)
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)
    ):
        assert np.abs(got - want).max() <= float32_roundoff(want, terms), path
    # The check has teeth: sp's loss of the same params is far from muP's.
    sp = _path_config({**changes, "mesh": {}})
    sp.model.attention, sp.model.parametrization = "xla", "sp"
    sp.model.context_parallel = reference.model.context_parallel
    sp_factory = factory_for(sp, ONE_DEVICE)
    with sp_factory.context():
        total, count = jax.jit(lambda p, b: step_lib.loss_sum_and_count(sp_factory.model, p, b))(
            params, batch
        )
    assert abs(float(total / count) - want_loss) > 10 * float32_roundoff(want_loss, terms)


def test_mup_lora_steps_scale_a_by_the_width_ratio_and_b_not():
    """LoRA's A (width -> rank) takes muP's hidden learning rate, B (rank -> width) the base
    one; the frozen base gets no update or optimizer state at all."""
    config = mup_config()
    config.train.lora_rank = 4
    factory = factory_for(config, ONE_DEVICE)
    params = jax.device_get(factory.create(jax.random.key(0))["params"])
    adapters, _ = step_lib.split_trained(factory.model, params)
    grads = jax.tree.map(lambda a: np.full_like(a, 0.01), adapters)
    t = config.train
    plain = optim.make_optimizer(t)
    scaled = optim.make_optimizer(t, hidden_lr_ratio=mup.ratio_of(factory.model.cfg))
    want, _ = plain.update(grads, plain.init(adapters), adapters)
    got, _ = scaled.update(grads, scaled.init(adapters), adapters)
    leaves = jax.tree_util.tree_leaves_with_path(got)
    assert leaves and all(p[-1].key.endswith(("_lora_a", "_lora_b")) for p, _ in leaves)
    for (path, g), w in zip(leaves, jax.tree.leaves(want)):
        ratio = 0.5 if path[-1].key.endswith("_lora_a") else 1.0
        np.testing.assert_allclose(np.asarray(g), ratio * np.asarray(w), rtol=1e-6)
        assert np.abs(np.asarray(w)).max() > 0, path  # an update that could be scaled


class _StopAt(Exception):
    pass


@pytest.mark.slow  # three short training runs
def test_a_mup_run_resumes_from_its_checkpoint_exactly(tmp_path, tokenizer_path):
    """A muP run of 4 updates equals one stopped after update 2 and resumed from checkpoint 1:
    the multipliers come back with the config, the optimizer state with the checkpoint."""

    def config():
        c = short_run_config(tokenizer_path, 4, warmup_steps=1, eval_every=2)
        c.model.parametrization, c.model.mup_base_width = "mup", 32
        c.checkpoint.every = 1
        return c

    def stop(step, _):  # at the validation of update 2, before its checkpoint
        raise _StopAt

    assert mup.ratio_of(factory_for(config(), ONE_DEVICE).model.cfg) == 0.5
    train_lib.train(config(), tmp_path / "unbroken")
    with pytest.raises(_StopAt):
        train_lib.train(config(), tmp_path / "resumed", on_validation=stop)
    train_lib.train(config(), tmp_path / "resumed")
    assert_ends_as_unbroken(tmp_path, tmp_path / "resumed", 4, config())
