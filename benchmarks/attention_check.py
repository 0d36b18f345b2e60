"""Check cuDNN attention against the XLA reference on a GPU: bf16 agreement and speed.

    python -m benchmarks.attention_check

For unpacked rows (causal only) and packed rows (causal + segment mask), compares the
outputs and input gradients of `jaxlm.attention.attend` with impl="cudnn" and impl="xla" in
bfloat16 against a float32 XLA reference, and times forward+backward of each.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import platforms
from jaxlm.attention import Settings, attend


def attention(q, k, v, segment_ids, impl):
    return attend(q, k, v, segment_ids, Settings(impl=impl))


def _loss_and_grads(impl, q, k, v, segment_ids, cotangent):
    def loss(q, k, v):
        out = attention(q, k, v, segment_ids, impl)
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _time(fn, *args, repeats=20):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(batch=8, length=2048, heads=32, kv_heads=4, head_dim=64):
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), jnp.float32)
    cot = jax.random.normal(keys[3], (batch, length, heads, head_dim), jnp.float32)
    packed = jnp.asarray(np.repeat(np.arange(1, 5), length // 4)[None].repeat(batch, 0), jnp.int32)
    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; q {q.shape}, kv heads {kv_heads}"
    )
    for name, segments in (("causal", None), ("packed", packed)):
        reference = _loss_and_grads("xla", q, k, v, segments, cot)(q, k, v)[1]
        bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
        for impl in ("xla", "cudnn"):
            fn = _loss_and_grads(impl, *bf16, segments, cot)
            grads = fn(*bf16)[1]
            errors = [
                float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
                for g, r in zip(grads, reference)
            ]
            out_ref = attention(q, k, v, segments, "xla")
            out = attention(*bf16, segments, impl).astype(jnp.float32)
            out_error = float(jnp.max(jnp.abs(out - out_ref)) / jnp.max(jnp.abs(out_ref)))
            print(
                f"{name:7s} {impl:6s} bf16: max rel error out {out_error:.2e}, grads q/k/v "
                + "/".join(f"{e:.2e}" for e in errors)
                + f"; fwd+bwd {_time(fn, *bf16):.2f} ms"
            )


if __name__ == "__main__":
    main()
