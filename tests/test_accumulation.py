"""Gradient accumulation equals the one big batch: the applied gradient is the mean over the
window's real targets, whatever the microbatches' masks; the logged loss and the validation
set do not depend on the microbatch."""

import json

import jax
import numpy as np
import pytest
from support import factory_for, float32_roundoff, loss_terms, packed_batch, small_config
from test_sft import WORDS, _write_jsonl, sp_tokenizer  # noqa: F401  (a fixture)

from jaxlm import accumulation, lora
from jaxlm import sharding as sharding_lib
from jaxlm import step as step_lib
from jaxlm import train as train_lib

ROWS = 32


def _adam_mu(opt_state):
    return next(
        s.mu
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")
    )


def _masked_batch(config, seed=0):
    """ROWS packed rows whose loss masks keep very different shares of the targets, by
    quarter of the batch (so every split into microbatches has unequal counts)."""
    batch = packed_batch(config, ROWS, seed=seed)
    rng = np.random.default_rng(seed)
    keep = np.repeat([0.15, 0.9, 0.4, 1.0], ROWS // 4)[:, None]
    batch["loss_mask"] = batch["loss_mask"] & (rng.random(batch["loss_mask"].shape) < keep)
    return batch


_STEPS = {}  # (k, lora_rank) -> (factory, train step): each compiles once per test session


def _one_update(config, microbatches, exact: bool, base=None):
    """State after one optimizer update over `microbatches` (float32 host arrays)."""
    t = config.train
    key = (t.grad_accum_steps, t.lora_rank, t.noise_scale_halves)
    if key not in _STEPS:
        factory = factory_for(config)
        _STEPS[key] = factory, step_lib.make_train_step(factory)
    factory, train_step = _STEPS[key]
    if base is None:
        state = factory.create(jax.random.key(0))
    else:  # LoRA: adapters with a random B beside the given base
        adapters = jax.device_get(factory.create_trained(jax.random.key(0)))
        rng = np.random.default_rng(1)
        adapters["params"] = jax.tree_util.tree_map_with_path(
            lambda p, x: (
                (0.3 * rng.standard_normal(x.shape)).astype(x.dtype)
                if p[-1].key.endswith("_lora_b")
                else x
            ),
            adapters["params"],
        )
        state = jax.device_put(factory.assemble(adapters, base), factory.shardings)
    targets = accumulation.window_targets(microbatches) if exact else 0.0
    parts = []  # |each microbatch's gradient as fed to the window's sum|
    with factory.context():
        for rows in microbatches:
            batch = sharding_lib.global_batch(rows, factory.batch_sharding)
            state, metrics = train_step(state, batch, targets)
            own, count = np.sqrt(metrics["micro_grad_sq"][0]), metrics["part_tokens"][0]
            parts.append(float(own * count / (targets / len(microbatches)) if exact else own))
    state = jax.device_get(state)
    params = lora.split(state["params"])[0] if base is not None else state["params"]
    return params, _adam_mu(state["opt_state"]), {**jax.device_get(metrics), "parts": parts}


def _config(k: int, lora_rank: int = 0):
    config = small_config(fsdp=8)  # 8 simulated devices
    t = config.train
    # eps=1e-4 keeps Adam's first step lr * g / (|g| + eps) well-conditioned where g ~ 1e-8,
    # so the params compare accumulation, not float32 rounding of tiny gradients.
    t.global_batch_size, t.grad_accum_steps, t.eps = ROWS, k, 1e-4
    if lora_rank:
        t.lora_rank, t.lora_alpha = lora_rank, 8.0
    return config


def _split(batch, k):
    n = ROWS // k
    return [{key: v[i * n : (i + 1) * n] for key, v in batch.items()} for i in range(k)]


def _relative_gap(a_tree, b_tree) -> float:
    """|a - b| / |a| over all leaves together (L2): float32 sums in another order differ by
    round-off relative to their terms, which cancellation leaves large next to a few leaves."""
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (a_tree, b_tree))
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.fixture(scope="module")
def lora_base():
    return jax.device_get(factory_for(small_config(fsdp=8)).create(jax.random.key(1))["params"])


@pytest.mark.parametrize(
    "lora_rank", [0, pytest.param(4, marks=pytest.mark.slow)], ids=["full", "lora"]
)
def test_k_microbatches_with_unequal_masks_equal_one_big_batch(lora_rank, lora_base):
    base = lora_base if lora_rank else None
    batch = _masked_batch(_config(1))
    counts = [int(rows["loss_mask"].sum()) for rows in _split(batch, 4)]
    assert max(counts) > 3 * min(counts)  # the microbatches' masks really differ
    # The big batch: one microbatch normalised by its own count, as without accumulation.
    big_params, big_mu, big = _one_update(_config(1, lora_rank), [batch], exact=False, base=base)
    # The step's microbatch squared gradient norm (for the noise scale) is |gradient|^2, and
    # the gradient is Adam's first moment / (1 - b1).
    expected_sq = sum(np.sum(np.square(m / 0.1, dtype=np.float64)) for m in jax.tree.leaves(big_mu))
    np.testing.assert_allclose(float(big["micro_grad_sq"][0]), expected_sq, rtol=1e-4)
    # Round-off alone: the same big batch with its rows in reverse order (float32 sums taken
    # in another order, as accumulation takes them).
    reverse = {key: v[::-1] for key, v in batch.items()}
    r_params, r_mu, _ = _one_update(_config(1, lora_rank), [reverse], exact=False, base=base)
    roundoff = _relative_gap(big_mu, r_mu), _relative_gap(big_params, r_params)
    print(f"rows reversed: gradient {roundoff[0]:.2e}, params {roundoff[1]:.2e} relative")
    for k in (1, 2, 4):
        params, mu, metrics = _one_update(_config(k, lora_rank), _split(batch, k), True, base)
        # Adam's first moment after one update is (1 - b1) * the applied gradient.
        gaps = _relative_gap(big_mu, mu), _relative_gap(big_params, params)
        cancel = sum(metrics["parts"]) / np.sqrt(big["micro_grad_sq"][0])
        bound = float32_roundoff(cancel, loss_terms(_config(1)))
        print(f"k={k}: gradient {gaps[0]:.2e} (bound {bound:.1e}), params {gaps[1]:.2e} relative")
        # LoRA's adapter gradients on random data are mostly noise: each microbatch's is far
        # larger than the window's mean, so float32 round-off of their sum (support.loss_terms)
        # is relative to the parts' sizes, sum |part| / |mean|, not to the mean's (as reordering
        # one batch's rows gives). LoRA k=4 measured 0.02 of it (AMD EPYC), 0.97 of the 1e-5 it
        # replaces. Normalising each microbatch by its own count (below) is off by 0.7, 1500x
        # the bound (4e-4 at k=4); a window miscounted by one of its ~600 targets is 4x.
        assert gaps[0] <= max(bound, 2 * roundoff[0]), k
        assert gaps[1] <= max(1e-5 if lora_rank else 1e-6, 2 * roundoff[1]), k
    # Normalising each microbatch by its own count (the old way) is measurably different:
    # the comparison above can fail.
    _, naive_mu, _ = _one_update(_config(4, lora_rank), _split(batch, 4), False, base=base)
    naive = _relative_gap(big_mu, naive_mu)
    print(f"each microbatch normalised by its own count: gradient {naive:.2e} relative")
    assert naive > 1e-2


@pytest.mark.slow  # two short SFT runs
def test_sft_run_logs_the_same_losses_with_four_microbatches_as_with_one(sp_tokenizer, tmp_path):  # noqa: F811
    rng = np.random.default_rng(0)
    records = []
    for _ in range(300):  # prompts and answers of uneven lengths: unequal masked counts
        words = list(rng.choice(WORDS, rng.integers(2, 9)))
        records.append({"prompt": " ".join(words) + "\n", "completion": " ".join(words[::-1])})
    _write_jsonl(tmp_path / "chats.jsonl", records)
    logged = {}
    for k in (1, 4):
        config = small_config(fsdp=-1)
        config.model.vocab_size = 384
        config.data.source, config.data.tokenizer = f"sft:{tmp_path}/*.jsonl", str(sp_tokenizer)
        config.data.chat_template, config.data.val_fraction = "plain", 0.1
        config.data.eval_batches = 1
        t = config.train
        t.global_batch_size, t.grad_accum_steps = 32, k
        t.steps, t.eval_every, t.log_every = 6, 6, 1
        train_lib.train(config, tmp_path / f"run{k}")
        rows = (tmp_path / f"run{k}/metrics.jsonl").read_text().splitlines()
        logged[k] = [json.loads(line) for line in rows]
    one, four = logged[1], logged[4]
    losses = [(r["loss"], s["loss"]) for r, s in zip(one, four) if "loss" in r]
    val = [(r["val_loss"], s["val_loss"]) for r, s in zip(one, four) if "val_loss" in r]
    print("losses", losses, "val_loss", val)
    assert [r["step"] for r in one] == [r["step"] for r in four]
    # The gradient noise scale needs two batch sizes: logged with 4 microbatches, not with 1.
    # (absent from a row while the smoothed |G|^2 estimate is not yet positive)
    noise = [r["gradient_noise_scale"] for r in four if "gradient_noise_scale" in r]
    assert noise and all(np.isfinite(noise)) and "gradient_noise_scale" in four[-2]
    assert not any("gradient_noise_scale" in r for r in one)
    assert len(losses) == 6 and len(val) == 2
    for a, b in losses + val:
        assert abs(a - b) <= 2e-5 * abs(a)


def test_halves_give_the_same_update_and_each_half_its_own_gradient_norm():
    """train.noise_scale_halves: one microbatch differentiated as two halves side by side
    applies the gradient of the whole, and reports |each half's own mean gradient|^2, as a
    step over that half alone computes it (the noise scale's small batches)."""
    batch = _masked_batch(_config(1))
    config = _config(1)
    config.train.noise_scale_halves = True
    params, mu, metrics = _one_update(config, [batch], exact=True)
    want_params, want_mu, whole = _one_update(_config(1), [batch], exact=True)
    assert _relative_gap(want_mu, mu) <= 1e-6
    assert _relative_gap(want_params, params) <= 1e-6
    assert metrics["micro_grad_sq"].shape == metrics["part_tokens"].shape == (2,)
    for h, half in enumerate(_split(batch, 2)):
        config = _config(1)
        config.train.global_batch_size = ROWS // 2
        _, _, alone = _one_update(config, [half], exact=False)  # its own mean gradient
        assert float(metrics["part_tokens"][h]) == half["loss_mask"].sum()
        np.testing.assert_allclose(
            float(metrics["micro_grad_sq"][h]), float(alone["micro_grad_sq"][0]), rtol=1e-4
        )
    assert float(whole["target_tokens"]) == float(metrics["part_tokens"].sum())
