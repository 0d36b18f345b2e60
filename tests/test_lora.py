"""LoRA: adapters beside a frozen base start exactly at the base, merge into it, are all that
trains and all a checkpoint holds, agree across meshes, resume exactly; bad input is named."""

import json
import pathlib
import signal

import jax
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file
from support import (
    factory_for,
    float32_roundoff,
    logit_terms,
    loss_terms,
    packed_batch,
    small_config,
)
from test_fault_tolerance import assert_ends_as_unbroken, cli, run_until, tiny_config

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import convert, metrics
from jaxlm import lora as lora_lib
from jaxlm import run as run_lib
from jaxlm import sharding as sharding_lib
from jaxlm import step as step_lib
from jaxlm import train as train_lib


def lora_config(**mesh):
    config = small_config(**mesh)
    config.train.lora_rank, config.train.lora_alpha = 4, 8.0
    return config


def merged_terms(config) -> int:
    """The sums behind a logit that merging rounds differently: a logit's (support.logit_terms)
    for each adapted matrix (lora.TARGETS) of each layer."""
    return logit_terms(config) * len(lora_lib.TARGETS) * config.model.n_layers


def _logits_fn(factory):
    """params, batch -> logits, compiled once per factory."""
    forward = jax.jit(lambda p, b: step_lib.forward(factory.model, p, b))

    def logits(params, batch):
        with factory.context():
            return np.asarray(
                forward(params, sharding_lib.global_batch(batch, factory.batch_sharding))
            )

    return logits


ONE_DEVICE = jax.devices()[:1]


@pytest.fixture(scope="module")
def base():
    """A base model (random weights, trained by nobody) and its logits function."""
    factory = factory_for(small_config(), ONE_DEVICE)
    return _logits_fn(factory), jax.device_get(factory.create(jax.random.key(1))["params"])


def _with_random_b(adapters, seed=0):
    """Adapters whose B is random too (B starts at zero), so the update is not a no-op."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            (0.3 * rng.standard_normal(x.shape)).astype(x.dtype)
            if path[-1].key.endswith("_lora_b")
            else x
        ),
        adapters,
    )


def test_zero_b_is_the_base_bit_for_bit_and_merged_weights_keep_the_logits(base):
    base_logits, base_params = base
    factory = factory_for(lora_config(), ONE_DEVICE)
    adapters = jax.device_get(factory.create_trained(jax.random.key(0))["params"])
    flat = lora_lib.traverse_util.flatten_dict(adapters)
    assert {path[-1] for path in flat} == {f"{t}_lora_{x}" for t in lora_lib.TARGETS for x in "ab"}
    for path, a in flat.items():
        assert a.dtype == np.float32
        if path[-1].endswith("_lora_b"):
            assert not a.any()
        else:  # PEFT's kaiming-uniform: uniform in +-1 / sqrt(fan_in), std bound / sqrt(3)
            bound = np.prod(a.shape[1:-1]) ** -0.5
            assert np.abs(a).max() <= bound
            np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.15)
    batch = packed_batch(small_config(), 16)
    lora_logits = _logits_fn(factory)
    expected = base_logits(base_params, batch)
    np.testing.assert_array_equal(
        lora_logits(lora_lib.join(adapters, base_params), batch), expected
    )

    # With B random too, the adapted logits are those of the merged weights W + s A B.
    adapters = _with_random_b(adapters)
    unmerged = lora_logits(lora_lib.join(adapters, base_params), batch)
    merged = lora_lib.merge(lora_lib.join(adapters, base_params), 4, 8.0)
    assert jax.tree.structure(merged) == jax.tree.structure(base_params)
    # x (W + s A B) and x W + s (x A) B round differently in every adapted matrix of every
    # layer, each feeding a logit's sums: float32 round-off of that many sums (merged_terms).
    bound = float32_roundoff(unmerged, merged_terms(small_config()))
    np.testing.assert_allclose(base_logits(merged, batch), unmerged, atol=bound, rtol=0)
    assert np.abs(unmerged - expected).max() > 0.05


def test_steps_train_only_the_adapters_and_keep_the_base_dtype(base):
    config = lora_config()
    config.model.param_dtype = "bfloat16"  # the base stays bfloat16; adapters are float32
    factory = factory_for(config, ONE_DEVICE)
    base_params = jax.tree.map(lambda x: x.astype("bfloat16"), base[1])
    adapters = jax.device_get(factory.create_trained(jax.random.key(0)))
    # The optimizer state exists for the adapters alone.
    adam = next(
        s
        for s in jax.tree.leaves(adapters["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")
    )
    assert jax.tree.structure(adam.mu) == jax.tree.structure(adapters["params"])

    batch = packed_batch(config, 16)
    state = jax.device_put(factory.assemble(adapters, base_params), factory.shardings)

    def loss(params, batch):
        total, count = step_lib.loss_sum_and_count(factory.model, params, batch)
        return total / count

    train_step = step_lib.make_train_step(factory)
    with factory.context():
        batch = sharding_lib.global_batch(batch, factory.batch_sharding)
        # The step's gradient norm is that of the whole model's gradient cut to the adapters.
        whole = jax.device_get(jax.jit(jax.grad(loss))(state["params"], batch))
        expected = np.sqrt(
            sum(
                np.sum(np.square(g, dtype=np.float64))
                for g in jax.tree.leaves(lora_lib.split(whole)[0])
            )
        )
        state, metrics = train_step(state, batch)
        # Two compiles of the gradient: float32 round-off of its sums (support.loss_terms).
        bound = float32_roundoff(expected, loss_terms(config))
        np.testing.assert_allclose(float(metrics["grad_norm"]), expected, rtol=0, atol=bound)
        for _ in range(2):
            state, _ = train_step(state, batch)
    trained, frozen = lora_lib.split(jax.device_get(state["params"]))
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(base_params)):
        assert a.dtype == b.dtype == np.dtype("bfloat16")
        np.testing.assert_array_equal(a, b)
    for path, a in lora_lib.traverse_util.flatten_dict(trained).items():
        before = lora_lib.traverse_util.flatten_dict(adapters["params"])[path]
        assert a.dtype == np.float32 and np.abs(a - before).max() > 1e-4, path


def test_memory_line_shows_optimizer_state_for_the_adapters_only():
    factory = factory_for(lora_config(fsdp=8))

    def per_device(tree):
        return sum(
            np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
            for a in jax.tree.leaves(tree)
        )

    adapters = per_device(factory.trained(factory.abstract)["params"])
    optimizer = per_device(factory.abstract["opt_state"])
    assert optimizer == 2 * adapters + 8  # Adam's two moments of the adapters, two step counts
    line = metrics.memory_per_device(factory)
    assert (
        f"LoRA adapters {metrics.readable_bytes(adapters)}" in line
        and f"optimizer state {metrics.readable_bytes(optimizer)}" in line
    ), line


def test_sharded_mesh_trains_as_one_device(base):
    base_params = base[1]
    results = []
    for mesh, devices in (({}, ONE_DEVICE), ({"data": 2, "fsdp": 2, "tensor": 2}, None)):
        config = lora_config(**mesh)
        factory = factory_for(config, devices)
        adapters = jax.device_get(factory.create_trained(jax.random.key(0)))
        adapters["params"] = _with_random_b(adapters["params"])
        state = jax.device_put(factory.assemble(adapters, base_params), factory.shardings)
        train_step = step_lib.make_train_step(factory)
        losses, mus = [], []
        with factory.context():
            for seed in range(2):
                batch = sharding_lib.global_batch(
                    packed_batch(config, 16, seed), factory.batch_sharding
                )
                state, metrics = train_step(state, batch)
                losses.append(float(metrics["loss"]))
                mus.append(jax.device_get(optax.tree_utils.tree_get(state["opt_state"], "mu")))
        results.append((losses, jax.device_get(factory.trained(state)["params"]), mus))
    (one_losses, one, mus), (mesh_losses, sharded, _) = results
    # The mesh reorders the loss's sums over tokens and vocabulary: float32 round-off.
    terms = loss_terms(lora_config())
    bound = float32_roundoff(one_losses, terms)
    np.testing.assert_allclose(mesh_losses, one_losses, rtol=0, atol=bound)
    # Adam moves an entry by about lr * g / (|g| + eps) an update, so a gradient's round-off dg
    # (float32_roundoff of the same sums) moves it by up to lr * 2 dg / (|g| + eps): tiny where
    # |g| is ordinary, up to a flip where g nearly vanishes (an up_lora_b entry with |g| = 4e-8
    # at update 1 moved 3e-6, 0.3 of the old 1e-5 * max|b| on AMD EPYC). The gradients are the
    # first moments unrolled: g_t = (mu_t - b1 mu_(t-1)) / (1 - b1). Max error / bound 0.04
    # (median bound 1e-5); a real error, a data shard's rows lost from the gradient, puts 97%
    # of the entries over their bound, the median 80x.
    t = lora_config().train
    previous, gradients = jax.tree.map(np.zeros_like, mus[0]), []
    for mu in mus:
        gradients.append(jax.tree.map(lambda m, p: (m - t.b1 * p) / (1 - t.b1), mu, previous))
        previous = mu
    leaves = zip(
        jax.tree_util.tree_leaves_with_path(sharded), *map(jax.tree.leaves, (one, *gradients))
    )
    for (path, a), b, *grads in leaves:
        bound = sum(2 * t.lr * float32_roundoff(g, terms) / (np.abs(g) + t.eps) for g in grads)
        error = np.abs(a - b) / bound  # each entry's error in units of its own bound
        np.testing.assert_allclose(error, 0, rtol=0, atol=1, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("lora_rank", -1, ["config.train.lora_rank=-1", "0 (LoRA off)"]),
        ("lora_targets", ("q", "qkv"), ["config.train.lora_targets=('q', 'qkv')", "'gate'"]),
        ("lora_targets", (), ["config.train.lora_targets=()", "non-empty"]),
        ("lora_alpha", 0.0, ["config.train.lora_alpha=0.0", "positive"]),
    ],
)
def test_bad_lora_config_names_the_field(field, value, words):
    config = lora_config()
    config.train[field] = value
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config, 8)
    for word in words:
        assert word in str(error.value), str(error.value)


# --- whole runs: checkpoints, merge, export, resume, and what goes wrong ------------------------


def lora_run_config(tokenizer_path, base_dir, steps):
    config = tiny_config(tokenizer_path, steps)
    config.train.lora_rank, config.train.lora_alpha = 4, 8.0
    config.train.lr = 1e-2  # adapters move visibly in a few steps
    config.checkpoint.init_from = str(base_dir / "checkpoints")
    return config


LORA_STEPS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_path):
    """A base model checkpoint (random weights, saved as an import saves one) and a LoRA run of
    LORA_STEPS beside it, checkpointed every 2 steps."""
    root = tmp_path_factory.mktemp("lora_runs")
    base_config = tiny_config(tokenizer_path, 1)
    base = jax.device_get(factory_for(base_config).create(jax.random.key(1))["params"])
    convert.save_params(
        root / "base" / "checkpoints",
        base,
        {"step": 0, "config": base_config.to_dict(), "tokenizer": tokenizer_path},
    )
    config = lora_run_config(tokenizer_path, root / "base", LORA_STEPS)
    train_lib.train(config, root / "unbroken")
    return root, config


def test_checkpoint_holds_adapters_and_a_base_reference_and_merges(runs, tmp_path, capsys):
    root, config = runs
    manager, step = checkpoint_lib.open_read_only(root / "unbroken" / "checkpoints")
    meta = checkpoint_lib.read_meta(manager, step)
    manager.close()
    assert meta["lora_base"] == {"path": str(root / "base" / "checkpoints"), "step": 0}
    state_dir = root / "unbroken" / "checkpoints" / str(step) / "state"
    saved = json.loads((state_dir / "_METADATA").read_text())["tree_metadata"]
    params = [k for k in saved if k.startswith("('params'")]
    assert params and all("_lora_" in k for k in params), params[:3]

    convert.main([f"--from_run={root / 'unbroken'}", "--merge_lora", f"--to={tmp_path / 'merged'}"])
    merged, merged_meta, _ = convert.read_run(tmp_path / "merged")
    assert merged_meta["config"]["train"]["lora_rank"] == 0
    # The merged checkpoint's logits are those of the base with the checkpointed adapters.
    factory = factory_for(config)
    trained = jax.device_get(
        checkpoint_lib.Checkpointer(root / "unbroken" / "checkpoints", keep=3, probe=False).restore(
            step, factory.trained(factory.abstract)
        )[0]
    )
    base_params = convert.read_run(root / "base")[0]
    batch = packed_batch(config, 8)
    lora_logits = _logits_fn(factory)(lora_lib.join(trained["params"], base_params), batch)
    config = config.copy_and_resolve_references()
    config.train.lora_rank = 0
    error = np.abs(_logits_fn(factory_for(config))(merged, batch) - lora_logits).max()
    # Merged weights round differently from the adapters beside them: float32 round-off.
    bound = float32_roundoff(lora_logits, merged_terms(config))
    assert error <= bound, (error, bound)
    # ... and it exports like any other run.
    convert.main([f"--from_run={tmp_path / 'merged'}", f"--to_hf={tmp_path / 'hf'}"])
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    np.testing.assert_array_equal(
        tensors["model.layers.1.mlp.down_proj.weight"], merged["layers"]["mlp"]["down"][1].T
    )


def test_lora_mistakes_are_named(runs, tmp_path, capsys):
    root, config = runs
    no_base = config.copy_and_resolve_references()
    no_base.checkpoint.init_from = ""
    with pytest.raises(
        config_lib.ConfigError, match="lora_rank=4 needs config.checkpoint.init_from"
    ):
        train_lib.train(no_base, tmp_path / "a")
    other = lora_run_config(config.data.tokenizer, root / "base", LORA_STEPS + 1)
    other.train.lora_targets = ("q", "v")
    with pytest.raises(
        config_lib.ConfigError,
        match=r"= \(4, 8.0, \('q', 'v'\)\) but .* with \(4, 8.0, \('down', 'gate'",
    ):
        train_lib.train(other, root / "unbroken")
    with pytest.raises(checkpoint_lib.CheckpointError, match="holds adapters only; merge"):
        train_lib.train(
            lora_run_config(config.data.tokenizer, root / "unbroken", 2), tmp_path / "b"
        )
    with pytest.raises(convert.ConvertError, match="is not a LoRA run"):
        convert.merge_lora(root / "base", tmp_path / "c")
    with pytest.raises(run_lib.RunError, match="is a LoRA run .* --merge_lora"):
        run_lib.load(root / "unbroken")

    (root / "base").rename(root / "base-moved")  # the base is gone
    try:
        with pytest.raises(
            checkpoint_lib.CheckpointError,
            match=r"trained beside the base model .*base/checkpoints/0.*put that",
        ):
            train_lib.train(
                lora_run_config(config.data.tokenizer, root / "base-moved", LORA_STEPS + 1),
                root / "unbroken",
            )
        with pytest.raises(convert.ConvertError, match="is not there; put it back"):
            convert.merge_lora(root / "unbroken", tmp_path / "d")
    finally:
        (root / "base-moved").rename(root / "base")


@pytest.mark.slow  # other processes
def test_killed_lora_run_resumes_exactly(runs, repo, tmp_path):
    root, config = runs
    command = [
        *cli(config.data.tokenizer, tmp_path / "killed", LORA_STEPS),
        "--config.train.lora_rank=4",
        "--config.train.lora_alpha=8.0",
        "--config.train.lr=0.01",
        f"--config.checkpoint.init_from={root / 'base' / 'checkpoints'}",
    ]
    code, output = run_until(command, repo, "step 5/6 | loss")
    assert code == -signal.SIGKILL, output[-3000:]
    assert "LoRA rank 4" in output and "optimizer state" in output
    code, output = run_until(command, repo)
    assert code == 0, output[-3000:]
    assert "resumed from" in output
    (tmp_path / "unbroken").symlink_to(root / "unbroken")
    assert_ends_as_unbroken(tmp_path, tmp_path / "killed", LORA_STEPS, config)
    assert pathlib.Path(tmp_path / "killed" / "checkpoints").is_dir()


def test_lora_flops_formula_agrees_with_xla():
    """The LoRA count (frozen weights 4x, adapters 6 * rank * (in + out)) against XLA's count
    of one compiled forward + backward w.r.t. the adapters (a 1-layer model: XLA counts a
    loop body once; 128 positions: the attention computes the full square)."""
    config = lora_config()
    m = config.model
    m.vocab_size, m.d_model, m.n_layers, m.d_ff, m.n_heads, m.n_kv_heads = 512, 256, 1, 768, 4, 2
    m.remat, m.attention, m.dtype = "none", "xla", "float32"
    config.data.seq_len, config.train.global_batch_size = 128, 4
    config.train.lora_targets = ("q", "v", "o", "down")
    factory, derived = step_lib.build(config, ONE_DEVICE)
    adapters, frozen = lora_lib.split(factory.abstract["params"])

    def loss(adapters, frozen, batch):
        total, count = step_lib.loss_sum_and_count(
            factory.model, lora_lib.join(adapters, frozen), batch
        )
        return total / count

    tokens = jax.ShapeDtypeStruct((4, 128), np.int32)
    batch = {"inputs": tokens, "targets": tokens, "loss_mask": jax.ShapeDtypeStruct((4, 128), bool)}
    with factory.context():
        analysis = jax.jit(jax.grad(loss)).lower(adapters, frozen, batch).compile().cost_analysis()
    xla = (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"] / (4 * 128)
    per_token = metrics.flops_per_token(
        m, derived.head_dim, 128, causal=False, lora_rank=4, lora_targets=config.train.lora_targets
    )
    # Nothing before the first layer trains, so the gradient of its q, k, v projections'
    # input (2 * their params, 2 * rank * d_model for each adapted one) is dead code to XLA.
    d_attn, d_kv = m.n_heads * derived.head_dim, m.n_kv_heads * derived.head_dim
    dead = 2 * m.d_model * (d_attn + 2 * d_kv) + 2 * 4 * m.d_model * 2
    assert xla == pytest.approx(per_token - dead, rel=0.05)
    full = metrics.flops_per_token(m, derived.head_dim, 128, causal=False)
    assert xla < 0.8 * full  # the frozen weights' gradients are not computed
