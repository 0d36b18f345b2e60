"""The gradient noise scale estimator recovers a known tr(Sigma) / |G|^2."""

import numpy as np

from jaxlm import noise_scale


def test_linear_regression_noise_scale_within_20_percent():
    # Least squares, loss 0.5 (x.w - y)^2 with x ~ N(0, I_d), y = x.w* + N(0, sigma^2), at
    # w = w* + delta: the per-example gradient x (x.delta - noise) has mean G = delta and
    # covariance (|delta|^2 + sigma^2) I + delta delta^T (Isserlis), so
    # B_simple = (d (|delta|^2 + sigma^2) + |delta|^2) / |delta|^2 examples.
    rng = np.random.default_rng(0)
    d, sigma, micro, k = 16, 0.5, 32, 4
    delta = rng.standard_normal(d) * 0.3
    expected = (d * (delta @ delta + sigma**2) + delta @ delta) / (delta @ delta)
    estimate = noise_scale.NoiseScale(decay=0.99)
    for _ in range(2000):
        micro_grads = []
        for _ in range(k):
            x = rng.standard_normal((micro, d))
            residual = x @ delta - sigma * rng.standard_normal(micro)
            micro_grads.append((x * residual[:, None]).mean(axis=0))
        big = np.mean(micro_grads, axis=0)
        estimate.add_window(
            [g @ g for g in micro_grads], [micro] * k, float(big @ big), float(micro * k)
        )
    got = estimate.value()
    print(f"B_simple estimated {got:.1f}, true {expected:.1f}")
    assert abs(got - expected) <= 0.2 * expected
    # Resuming from the saved state continues the same averages.
    again = noise_scale.NoiseScale(estimate.state(), decay=0.99)
    assert again.value() == got


def test_one_microbatch_or_a_nonfinite_one_gives_no_estimate():
    estimate = noise_scale.NoiseScale()
    estimate.add_window([1.0], [10], 1.0, 10.0)
    estimate.add_window([1.0, float("nan")], [10, 10], 1.0, 20.0)
    assert estimate.value() is None
