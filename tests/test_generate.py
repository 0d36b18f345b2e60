"""Generation with a KV cache (jaxlm.generate) against the full forward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import assert_greedy

from jaxlm import generate as gen
from jaxlm import model as model_lib
from jaxlm import param_layout
from jaxlm import run as run_lib

# Weights large enough that logits are far from ties: argmax comparisons are meaningful.
CFG = model_lib.ModelConfig(
    vocab_size=96,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    d_ff=128,
    init_std=0.15,
)
MAX_LEN = 64


@pytest.fixture(scope="module")
def params():
    model = model_lib.Transformer(CFG)
    return nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, size=n).tolist() for n in lengths]


def full_logits(params, tokens):
    return np.asarray(
        model_lib.Transformer(CFG).apply({"params": params}, jnp.asarray([tokens], jnp.int32))[0]
    )


@pytest.mark.parametrize("unstacked", [False, True], ids=["scanned", "unstacked"])
def test_cached_greedy_is_argmax_of_the_full_forward_at_every_step(params, unstacked):
    """Decoding with the layers scanned (cache in the carry) and with one module per layer
    (param_layout.for_decoding, as run.load gives) against training's scanned full forward."""
    decode_params, cfg = param_layout.for_decoding(params, CFG) if unstacked else (params, CFG)
    assert cfg.scan_layers != unstacked and ("layers_1" in decode_params) == unstacked
    prompt = prompts([5])[0]
    out = gen.generate(
        decode_params, cfg, [prompt], max_len=MAX_LEN, max_new_tokens=20, temperature=0.0
    )[0]
    assert len(out) == 20
    logits = full_logits(params, prompt + out[:-1])
    # Cache and full forward sum in other orders: argmax up to float32 round-off of a logit
    # (attention over the row, then the head's sum over d_model).
    assert_greedy(out, logits[len(prompt) - 1 :], MAX_LEN * CFG.d_model)
    assert len(set(out)) > 1  # not one token repeated: the check has teeth


def test_a_batch_of_mixed_lengths_equals_each_prompt_alone(params):
    batch = prompts([3, 17, 9, 1], seed=2)  # 17 needs a bigger bucket than the others
    together = gen.generate(params, CFG, batch, max_len=MAX_LEN, max_new_tokens=12, temperature=0.0)
    for prompt, out in zip(batch, together):
        alone = gen.generate(
            params, CFG, [prompt], max_len=MAX_LEN, max_new_tokens=12, temperature=0.0
        )[0]
        assert out == alone


def test_top_k_1_is_greedy(params):
    batch = prompts([4, 11], seed=3)
    greedy = gen.generate(params, CFG, batch, max_len=MAX_LEN, max_new_tokens=10, temperature=0.0)
    top1 = gen.generate(
        params, CFG, batch, max_len=MAX_LEN, max_new_tokens=10, temperature=1.0, top_k=1, seed=5
    )
    assert top1 == greedy


def test_top_p_never_samples_outside_the_nucleus():
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(probs))  # the most likely token is not token 0
    logits = jnp.asarray(np.log(probs[perm]))[None].repeat(512, axis=0)
    for top_p, nucleus_size in ((0.5, 2), (0.64, 2), (0.66, 3), (0.9, 4), (1.0, 6)):
        drawn = np.asarray(gen.sample(logits, jax.random.key(7), 1.0, 0, top_p))
        nucleus = set(perm.argsort()[:nucleus_size].tolist())  # token ids of the top probs
        assert set(drawn.tolist()) == nucleus, top_p  # all of it, and nothing else


def test_top_k_never_samples_outside_the_k_most_likely():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(256, 50)) * 0.1)
    drawn = np.asarray(gen.sample(logits, jax.random.key(3), 1.0, 3, 1.0))
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    assert all(d in row for d, row in zip(drawn, top3))


def test_the_same_seed_gives_the_same_tokens(params):
    batch = prompts([6, 2], seed=4)
    kwargs = dict(max_len=MAX_LEN, max_new_tokens=16, temperature=1.0, top_p=0.95)
    a = gen.generate(params, CFG, batch, seed=11, **kwargs)
    b = gen.generate(params, CFG, batch, seed=11, **kwargs)
    c = gen.generate(params, CFG, batch, seed=12, **kwargs)
    assert a == b
    assert a != c  # sampling does depend on the seed


def test_generation_stops_at_eos_and_at_the_context(params):
    prompt = prompts([5])[0]
    greedy = gen.generate(
        params, CFG, [prompt], max_len=MAX_LEN, max_new_tokens=8, temperature=0.0
    )[0]
    stopped = gen.generate(
        params,
        CFG,
        [prompt, prompt[:2]],
        max_len=MAX_LEN,
        max_new_tokens=8,
        temperature=0.0,
        eos_id=greedy[3],
    )
    assert stopped[0] == greedy[: greedy.index(greedy[3])]
    near_end = prompts([MAX_LEN - 3])[0]
    out = gen.generate(
        params, CFG, [near_end], max_len=MAX_LEN, max_new_tokens=10, temperature=0.0
    )[0]
    assert len(out) == 3  # the context is full
    logits = full_logits(params, near_end + out[:-1])[len(near_end) - 1 :]
    assert_greedy(out, logits, MAX_LEN * CFG.d_model)  # as in the test above


def test_sharded_generation_matches_one_device(params):
    from jaxlm import sharding as sharding_lib

    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1})
    rules = sharding_lib.axis_rules((("batch", None), ("length", None)))
    boxed = jax.eval_shape(
        lambda: model_lib.Transformer(CFG).init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))[
            "params"
        ]
    )
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    sharded = jax.device_put(params, shardings)
    q_spec = sharded["layers"]["attn"]["q"].sharding.spec
    assert q_spec[1:] == (("fsdp", "sequence"), "tensor", None)
    batch = prompts([7, 3, 12], seed=6)
    kwargs = dict(max_len=MAX_LEN, max_new_tokens=10, temperature=0.0)
    on_mesh = gen.generate(sharded, CFG, batch, mesh=mesh, rules=rules, **kwargs)
    assert on_mesh == gen.generate(params, CFG, batch, **kwargs)


def test_prompt_lengths_in_one_bucket_compile_nothing_new(params, monkeypatch):
    traces = []
    sample = gen.sample
    monkeypatch.setattr(gen, "sample", lambda *a: traces.append(1) or sample(*a))  # at trace
    kwargs = dict(max_len=MAX_LEN, max_new_tokens=8, temperature=0.5, top_k=13)  # fresh jit keys
    gen.generate(params, CFG, prompts([3]), **kwargs)
    assert len(traces) == 2  # prefill and decode step compiled
    gen.generate(params, CFG, prompts([12]), **kwargs)
    assert len(traces) == 2  # the same bucket (16) and cache: nothing new
    gen.generate(params, CFG, prompts([20]), **kwargs)
    assert len(traces) == 3  # bucket 32: a new prefill; the decode step's cache is the same
    assert [gen.bucket_length(n, MAX_LEN) for n in (1, 16, 17, 40)] == [16, 16, 32, 64]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(prompts_tokens=[list(range(MAX_LEN))]), "context is 64 tokens"),
        (dict(prompts_tokens=[[1, 2], []]), "prompt 1 is empty"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(prompts_tokens=[[1, CFG.vocab_size]]), "outside"),
    ],
)
def test_bad_input_is_a_clear_error(params, bad, message):
    kwargs = {"prompts_tokens": [[1, 2, 3]], "max_len": MAX_LEN, "temperature": 1.0, **bad}
    with pytest.raises(gen.GenerateError, match=message):
        gen.generate(params, CFG, **kwargs)


def test_bad_output_or_prompts_file_is_named_before_generating(tmp_path):
    """Checked before the run loads: --output a directory used to fail at the very end."""
    from jaxlm import files

    with pytest.raises(files.PathError, match=r"--output=.* is a directory; give a file name"):
        files.output_file(str(tmp_path), "--output")
    out = files.output_file(str(tmp_path / "new" / "completions.jsonl"), "--output")
    assert out.parent.is_dir() and not out.exists()
    with pytest.raises(gen.GenerateError, match=r"--prompts_file=.*nope.jsonl: no such file"):
        gen._read_prompts([], str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------- from a training run


@pytest.fixture(scope="module")
def run_dir(small_run):
    return small_run


def test_a_run_generates_on_its_mesh_as_the_full_forward_says(run_dir):
    run = run_lib.load(run_dir)
    assert run.max_len == 64 and run.step == 2 and dict(run.mesh.shape)["tensor"] == 2
    assert not run.config.scan_layers  # unstacked for decoding, training's layout kept
    up = run.params["layers_1"]["mlp"]["up"]  # [d, ff]: FSDP 4 ways, tensor 2 ways
    assert up.sharding.shard_shape(up.shape) == (up.shape[0] // 4, up.shape[1] // 2)
    sp = run.tokenizer
    tokens = [sp.bos_id()] + sp.encode("def main(")
    out = gen.generate(
        run.params,
        run.config,
        [tokens],
        max_new_tokens=6,
        temperature=0.0,
        **{**run.kwargs(), "eos_id": None},
    )[0]
    model = model_lib.Transformer(run.config)
    unsharded = jax.device_get(run.params)
    logits = model.apply({"params": unsharded}, jnp.asarray([tokens + out[:-1]]))[0]
    # The mesh and the cache sum in other orders: argmax up to float32 round-off of a logit.
    assert_greedy(out, logits[len(tokens) - 1 :], run.max_len * run.config.d_model)


def test_a_run_without_a_tokenizer_is_a_clear_error(run_dir, tmp_path):
    import json
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    # As when a run moves to another machine: the tokenizer its checkpoint names is not there.
    meta = copy / "checkpoints" / "2" / "meta" / "metadata"
    recorded = json.loads(meta.read_text())
    meta.write_text(json.dumps({**recorded, "tokenizer": str(tmp_path / "gone.model")}))
    with pytest.raises(run_lib.RunError, match="has no tokenizer.*--tokenizer=PATH"):
        run_lib.load(copy)
    assert run_lib.load(copy, tokenizer=recorded["tokenizer"]).step == 2
    with pytest.raises(run_lib.RunError, match="no checkpoints/"):
        run_lib.load(tmp_path / "nothing")
    with pytest.raises(run_lib.RunError, match=r"has no checkpoint 150 \(it has \[2\]\)"):
        run_lib.load(copy, tokenizer=recorded["tokenizer"], step=150)


@pytest.mark.slow  # subprocesses
def test_cli_streams_and_writes_jsonl(run_dir, repo, tmp_path):
    import json
    import os
    import subprocess
    import sys

    def cli(*args):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        return subprocess.run(
            [sys.executable, "-m", "jaxlm.generate", f"--from={run_dir}", *args],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )

    streamed = cli("--prompt=def main(", "--prompt=import", "--max_new_tokens=8", "--temperature=0")
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    lines = streamed.stdout.splitlines()
    assert lines[0].startswith("[0] def main(") and lines[1].startswith("[1] import")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def main("}) + "\n" + json.dumps("import") + "\n")
    out = tmp_path / "out.jsonl"
    written = cli(
        f"--prompts_file={prompts}", f"--output={out}", "--max_new_tokens=8", "--temperature=0"
    )
    assert written.returncode == 0, written.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["def main(", "import"]
    assert all(1 <= len(r["tokens"]) <= 8 and r["stop"] in ("eos", "length") for r in rows)
    # greedy: the streamed text is the written one
    assert streamed.stdout.startswith("[0] def main(" + rows[0]["completion"] + "\n[1] import")
    bad = cli("--prompt=x", "--top_p=1.5")
    assert bad.returncode != 0 and "top_p=1.5 is invalid" in bad.stderr


GENERATE_7B = """
import importlib.util, json
import flax.linen as nn, jax, jax.numpy as jnp
from jaxlm import config as config_lib, generate as gen, model as model_lib
from jaxlm import sharding as sharding_lib
spec = importlib.util.spec_from_file_location("config_7b", "configs/7b.py")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
config = module.get_config()
config.mesh.update(dict(data=1, fsdp=4, tensor=2, sequence=1))
config.train.update(dict(global_batch_size=8, grad_accum_steps=1))
derived = config_lib.validate(config, 8)
cfg = config_lib.model_config(config, derived)
mesh = sharding_lib.make_mesh(derived.mesh_shape)
rules = sharding_lib.axis_rules((("batch", None), ("length", None)))
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: model_lib.Transformer(cfg).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.unbox(boxed), shardings)
static = gen._Static(cfg, rules, 1.0, 0, 0.9)
rows = jax.ShapeDtypeStruct((8,), jnp.int32)
with jax.set_mesh(mesh):
    prefill = gen._prefill.lower(static, 2176, params, jax.ShapeDtypeStruct((8, 2048), jnp.int32),
                                 rows, jax.random.key(0)).compile()
    out = jax.eval_shape(gen._prefill, static, 2176, params,
                         jax.ShapeDtypeStruct((8, 2048), jnp.int32), rows, jax.random.key(0))[1]
    cache = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)
             for (k, v), s in zip(out.items(), prefill.output_shardings[1].values())}
    decode = gen._decode.lower(static, params, cache, rows, rows, jax.random.key(0)).compile()
memory = decode.memory_analysis()
print(json.dumps(dict(cache_spec=str(prefill.output_shardings[1]["k"].spec),
                      argument=memory.argument_size_in_bytes, alias=memory.alias_size_in_bytes)))
"""


@pytest.mark.slow  # a subprocess of 8 devices compiling a 7B model (about 10 s)
def test_7b_prefill_and_decode_compile_on_an_fsdp_by_tensor_mesh(repo):
    import json
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", GENERATE_7B],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert "tensor" in got["cache_spec"]  # kv heads split over the tensor axis
    # One device's cache: 32 layers x 8 rows x 2176 slots x 16 of 32 kv heads x 128 x bf16, k
    # and v; donated to the step (aliased), so no second copy.
    cache_bytes = 32 * 8 * 2176 * 16 * 128 * 2 * 2
    assert got["alias"] == cache_bytes
    # and an eighth of the 6.7B float32 parameters (fsdp x tensor)
    assert got["argument"] < cache_bytes + 6.8e9 * 4 / 8 * 1.01
