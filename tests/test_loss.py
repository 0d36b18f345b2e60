"""The sliced LM-head loss (jaxlm.loss) against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.loss import cross_entropy_sum, token_cross_entropy


def _numpy_loss(x, head, targets, weights):
    logits = np.einsum("bld,dv->blv", x, head)
    top = logits.max(-1, keepdims=True)
    log_norm = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float(np.sum((log_norm - target_logit) * weights))


def _problem(seed=0, b=2, l=12, d=8, v=37):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, l, d))
    head = rng.standard_normal((d, v))
    targets = rng.integers(0, v, (b, l))
    weights = (rng.random((b, l)) > 0.25).astype(np.float64)  # some positions dropped
    return x, head, targets, weights


@pytest.mark.parametrize("chunks", [1, 3, 12])
def test_value_and_derivatives_match_numpy(chunks):
    x, head, targets, weights = _problem()
    args = [jnp.asarray(a, jnp.float32) for a in (x, head)]
    t, w = jnp.asarray(targets, jnp.int32), jnp.asarray(weights, jnp.float32)

    loss, (gx, gh) = jax.value_and_grad(cross_entropy_sum, argnums=(0, 1))(*args, t, w, chunks)
    assert abs(float(loss) - _numpy_loss(x, head, targets, weights)) < 1e-4 * abs(float(loss))

    rng = np.random.default_rng(1)
    for _ in range(3):  # directional derivatives by central differences, in float64
        dx, dh = rng.standard_normal(x.shape), rng.standard_normal(head.shape)
        eps = 1e-5
        numeric = (
            _numpy_loss(x + eps * dx, head + eps * dh, targets, weights)
            - _numpy_loss(x - eps * dx, head - eps * dh, targets, weights)
        ) / (2 * eps)
        analytic = float(np.sum(np.asarray(gx) * dx) + np.sum(np.asarray(gh) * dh))
        assert abs(analytic - numeric) < 1e-3 * abs(numeric)


def test_gradient_scales_with_the_cotangent_and_ignores_dropped_positions():
    x, head, targets, weights = _problem(seed=2)
    xj, hj = jnp.asarray(x, jnp.float32), jnp.asarray(head, jnp.float32)
    t, w = jnp.asarray(targets, jnp.int32), jnp.asarray(weights, jnp.float32)
    gx = jax.grad(lambda x: 2.5 * cross_entropy_sum(x, hj, t, w, 4))(xj)
    gx_once = jax.grad(lambda x: cross_entropy_sum(x, hj, t, w, 4))(xj)
    np.testing.assert_allclose(gx, 2.5 * gx_once, rtol=1e-6)
    assert np.all(np.asarray(gx)[weights == 0] == 0)


def test_bfloat16_inputs_give_close_float32_loss_and_bfloat16_gradients():
    x, head, targets, weights = _problem(seed=3)
    t, w = jnp.asarray(targets, jnp.int32), jnp.asarray(weights, jnp.float32)
    low = [jnp.asarray(a, jnp.bfloat16) for a in (x, head)]
    loss, (gx, gh) = jax.value_and_grad(cross_entropy_sum, argnums=(0, 1))(*low, t, w, 4)
    assert loss.dtype == jnp.float32 and gx.dtype == gh.dtype == jnp.bfloat16
    reference = _numpy_loss(
        np.asarray(low[0], np.float64), np.asarray(low[1], np.float64), targets, weights
    )
    assert abs(float(loss) - reference) < 1e-3 * abs(reference)


def test_bfloat16_gradients_are_rounded_once_after_the_cotangent():
    """Equal logits make the softmax gradient (1/4 - one_hot) exact in bfloat16, so the head's
    gradient is an exact float32 sum; scaled by the cotangent it must be rounded only once."""
    rng = np.random.default_rng(4)
    b, l, d, v = 2, 12, 8, 4
    x = rng.standard_normal((b, l, d)).astype(jnp.bfloat16)
    head = np.repeat(rng.standard_normal((d, 1)), v, axis=1).astype(jnp.bfloat16)
    targets = rng.integers(0, v, (b, l))
    scale = np.float32(1 / 3)
    grad_head = jax.grad(
        lambda h: (
            scale * cross_entropy_sum(jnp.asarray(x), h, jnp.asarray(targets), jnp.ones((b, l)), 3)
        )
    )(jnp.asarray(head))
    softmax_grad = np.full((b, l, v), 0.25)
    np.put_along_axis(softmax_grad, targets[..., None], -0.75, axis=-1)
    exact = np.einsum("bld,blv->dv", x.astype(np.float64), softmax_grad).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(grad_head), (scale * exact).astype(jnp.bfloat16))


def test_slices_must_divide_the_sequence():
    x, head, targets, weights = _problem()
    with pytest.raises(ValueError, match="loss_chunks"):
        cross_entropy_sum(
            jnp.asarray(x), jnp.asarray(head), jnp.asarray(targets), jnp.asarray(weights), 5
        )


def test_token_cross_entropy_matches_optax_and_numpy():
    """The select form jaxlm.step uses on TPU: optax's values and gradients, the NumPy loss."""
    x, head, targets, weights = _problem(seed=2)
    logits = jnp.asarray(np.einsum("bld,dv->blv", x, head), jnp.float32)
    targets_j = jnp.asarray(targets)

    def total(fn):
        return lambda lg: jnp.sum(fn(lg, targets_j) * jnp.asarray(weights, jnp.float32))

    got, got_grad = jax.value_and_grad(total(token_cross_entropy))(logits)
    want, want_grad = jax.value_and_grad(total(optax.softmax_cross_entropy_with_integer_labels))(
        logits
    )
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(got), _numpy_loss(x, head, targets, weights), rtol=1e-5)
