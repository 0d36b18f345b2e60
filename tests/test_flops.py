"""The FLOPs formula behind every MFU figure, and the arithmetic that turns step times into MFU.

Hand-computed counts for two shapes; the full-square count against XLA's own count of the
compiled forward+backward pass; MFU and peak arithmetic on made-up numbers.
"""

import math
import types

import jax
import jax.numpy as jnp
import pytest

from jaxlm import config as config_lib
from jaxlm import metrics
from jaxlm import step as step_lib


def shape(**fields):
    return types.SimpleNamespace(**fields)


# Issue #5's "small" shape: 4 layers of d_model 256, 4 heads x 64, MLP 768, vocab 32000.
SMALL = shape(vocab_size=32000, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=768)
# configs/1b.py (TinyLlama's shape): 22 layers of 2048, 32 query and 4 kv heads x 64, MLP 5632.
ONE_B = shape(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632)


@pytest.mark.parametrize(
    "m, head_dim, seq_len, causal, full_square",
    [
        # per layer: q,k,v,o 256*64*(4+4+4+4) = 262,144; MLP 3*256*768 = 589,824
        # 6 * 4 * 851,968 = 20,447,232; head 6*256*32000 = 49,152,000;
        # attention 6 * 4 layers * 256 * (4*64) = 1,572,864 causal, twice that full-square
        (SMALL, 64, 256, 71_172_096, 72_744_960),
        # per layer: 2048*64*(32+32+4+4) = 9,437,184; MLP 3*2048*5632 = 34,603,008
        # 6 * 22 * 44,040,192 = 5,813,305,344; head 6*2048*32000 = 393,216,000;
        # attention 6 * 22 * 2048 * 2048 = 553,648,128 causal
        (ONE_B, 64, 2048, 6_760_169_472, 7_313_817_600),
    ],
)
def test_flops_per_token_hand_computed(m, head_dim, seq_len, causal, full_square):
    assert metrics.flops_per_token(m, head_dim, seq_len, causal=True) == causal
    assert metrics.flops_per_token(m, head_dim, seq_len, causal=False) == full_square


def test_small_shape_step_flops_match_the_issue():
    """Issue #5 quotes 145.8 GFLOP per step for the small shape (8 x 256 tokens)."""
    per_step = metrics.flops_per_token(SMALL, 64, 256) * 8 * 256
    assert per_step == pytest.approx(145.8e9, rel=1e-3)


def _xla_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0]
    return analysis["flops"]


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2)])
def test_full_square_count_agrees_with_xla(n_heads, n_kv_heads):
    """XLA's flops for one compiled forward+backward of a small model without remat.

    At 128 positions the XLA attention is a single query block: it computes the whole square
    and masks it, so the full-square count is the one to compare. One layer: XLA's cost
    analysis counts a while loop's body once, so a scanned stack of n layers would be
    under-counted n-fold.
    """
    config = config_lib.default_config()
    m = config.model
    m.vocab_size, m.d_model, m.n_layers, m.d_ff = 512, 256, 1, 768
    m.n_heads, m.n_kv_heads, m.head_dim = n_heads, n_kv_heads, 64
    m.remat, m.attention, m.dtype = "none", "xla", "float32"
    batch_size, seq_len = 4, 128
    config.data.seq_len, config.train.global_batch_size = seq_len, batch_size
    factory, derived = step_lib.build(config, jax.devices()[:1])

    def loss(params, batch):
        total, count = step_lib.loss_sum_and_count(factory.model, params, batch)
        return total / count

    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    batch = {
        "inputs": tokens,
        "targets": tokens,
        "loss_mask": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.bool_),
    }
    with factory.context():
        compiled = (
            jax.jit(jax.value_and_grad(loss)).lower(factory.abstract["params"], batch).compile()
        )
    expected = metrics.flops_per_token(m, derived.head_dim, seq_len, causal=False)
    expected *= batch_size * seq_len
    assert _xla_flops(compiled) == pytest.approx(expected, rel=0.05)


def test_throughput_and_mfu_arithmetic():
    # Step times 2 s, 1 s, 4 s: the median (2 s) sets the rate; 4096 tokens per step.
    summary = metrics.throughput(
        [2.0, 1.0, 4.0],
        4096,
        flops_causal=1e9,
        flops_full_square=1.5e9,
        peak_total=8e12,
        n_devices=4,
    )
    assert summary["step_ms_median"] == 2000 and summary["step_ms_min"] == 1000
    assert summary["step_ms_max"] == 4000 and summary["steps"] == 3
    assert summary["tokens_per_second"] == 2048
    assert summary["tokens_per_second_per_device"] == 512
    assert summary["tflops_per_device"] == pytest.approx(512 * 1e9 / 1e12)  # 0.512
    assert summary["mfu_causal"] == pytest.approx(2048 * 1e9 / 8e12)  # 0.256
    assert summary["mfu_full_square"] == pytest.approx(2048 * 1.5e9 / 8e12)  # 0.384


def _device(kind, platform="gpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


def test_peak_flops_from_the_spec_table():
    peak, source = metrics.peak_flops_total([_device("NVIDIA H100 80GB HBM3")] * 8)
    assert peak == 8 * 989e12 and "989" in source
    peak, _ = metrics.peak_flops_total([_device("TPU v5 lite")] * 4)
    assert peak == 4 * 197e12
    peak, source = metrics.peak_flops_total([_device("Mystery Accelerator 9000")])
    assert math.isnan(peak) and "PEAK_FLOPS" in source


def test_cpu_peak_is_one_measurement_for_the_host(monkeypatch):
    """Simulated CPU devices share the cores: the peak is not multiplied by their count."""
    assert len(jax.devices()) == 8
    asked = []
    monkeypatch.setattr(
        metrics, "measure_cpu_peak", lambda repeats: asked.append(repeats) or 1.5e11
    )
    peak, source = metrics.peak_flops_total(jax.devices(), cpu_repeats=20)
    assert peak == 1.5e11 and source.startswith("measured: best of 20") and asked == [20]


def test_measured_cpu_peak_is_a_real_matmul_rate():
    assert 1e9 < metrics.measure_cpu_peak(size=512, repeats=2) < 1e14
