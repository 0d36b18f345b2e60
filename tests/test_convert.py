"""Hugging Face <-> jaxlm conversion against transformers' own LlamaForCausalLM (float32 weights,
its logits in float64, eager attention), with random models built here: logits, bitwise round
trips, tokenizers, errors, and training from a converted checkpoint."""

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import float32_roundoff

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlm import config as config_lib  # noqa: E402
from jaxlm import convert, hf_config  # noqa: E402
from jaxlm import train as train_lib  # noqa: E402
from jaxlm.data import tokenizer as tokenizer_lib  # noqa: E402
from jaxlm.model import Transformer  # noqa: E402

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def hf_model(seed=0, vocab=97, kv=2, tied=False, rope_scaling=None, head_dim=None, **changes):
    """A random float32 LlamaForCausalLM; norm weights are random too, so they are tested."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv,
        head_dim=head_dim or 8,
        # a copy: transformers writes rope_theta into the dict it is given
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        rope_scaling=dict(rope_scaling or {}) or None,
        tie_word_embeddings=tied,
        max_position_embeddings=512,
        **changes,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def hf_logits(model, tokens):
    """transformers' logits in float64 (on a float64 copy): a reference free of float32
    round-off, which the float32 models are compared against."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(torch.tensor(tokens)).logits.numpy()


def load_config(path):
    spec = importlib.util.spec_from_file_location("converted_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def jaxlm_logits(run_dir, tokens):
    """Logits of the converted model the way training builds it: config.py, then init_from."""
    config = load_config(run_dir / "config.py")
    derived = config_lib.validate(config, jax.device_count())
    model = Transformer(config_lib.model_config(config, derived))
    params, _, _ = convert.read_run(config.checkpoint.init_from)
    return np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))


def tokens_for(vocab, length=24, rows=2, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=(rows, length))


CASES = {  # kv heads, tied, rope scaling, explicit head_dim (!= hidden / heads), shard size
    "kv1-untied-sharded": dict(kv=1, tied=False, max_shard_size="20KB"),
    "kv2-tied-llama3": dict(kv=2, tied=True, rope_scaling=LLAMA3),
    "kv4-untied-llama3-head_dim16-sharded": dict(
        kv=4, tied=False, rope_scaling=LLAMA3, head_dim=16, max_shard_size="30KB"
    ),
    "kv2-tied-sharded": dict(kv=2, tied=True, max_shard_size="20KB"),
}


@pytest.mark.parametrize("case", CASES)
def test_import_matches_transformers_and_export_round_trips(tmp_path, case):
    options = dict(CASES[case])
    shard = options.pop("max_shard_size", None)
    model = hf_model(**options)
    hf_dir, run_dir, out_dir = tmp_path / "hf", tmp_path / "run", tmp_path / "out"
    model.save_pretrained(hf_dir, **({"max_shard_size": shard} if shard else {}))
    assert (hf_dir / "model.safetensors.index.json").is_file() == bool(shard)
    tokens = tokens_for(97)

    convert.import_hf(hf_dir, run_dir)
    want = hf_logits(model, tokens)
    got = jaxlm_logits(run_dir, tokens)
    assert np.abs(want).max() > 0.1  # the logits are not all near zero
    # float32 round-off of a logit (support.logit_terms): attention over the row, then the
    # head's sum over hidden_size.
    bound = float32_roundoff(want, tokens.shape[1] * model.config.hidden_size)
    np.testing.assert_allclose(got, want, atol=bound, rtol=0)

    convert.export_hf(run_dir, out_dir, max_shard_size="20KB")
    assert len(list(out_dir.glob("model-*.safetensors"))) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    np.testing.assert_allclose(hf_logits(reloaded, tokens), want, atol=bound, rtol=0)
    original, again = model.state_dict(), reloaded.state_dict()
    assert original.keys() == again.keys()
    for name in original:
        assert torch.equal(original[name], again[name]), name

    # import(export(x)) is bitwise x
    convert.import_hf(out_dir, tmp_path / "run2")
    first, _, _ = convert.read_run(run_dir)
    second, _, _ = convert.read_run(tmp_path / "run2")
    jax.tree.map(np.testing.assert_array_equal, first, second)
    assert jax.tree.structure(first) == jax.tree.structure(second)


def test_bfloat16_checkpoint_keeps_its_bits(tmp_path):
    model = hf_model(kv=1).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    convert.import_hf(tmp_path / "hf", tmp_path / "run")
    params, meta, _ = convert.read_run(tmp_path / "run")
    assert meta["config"]["model"]["param_dtype"] == "bfloat16"
    assert params["embedding"].dtype == jnp.bfloat16
    convert.export_hf(tmp_path / "run" / "checkpoints" / "0", tmp_path / "out")  # one step
    # Like --to, --to_hf refuses a directory that holds a model, unless told to replace it.
    with pytest.raises(convert.ConvertError, match="already holds.*--overwrite"):
        convert.export_hf(tmp_path / "run", tmp_path / "out")
    convert.export_hf(tmp_path / "run", tmp_path / "out", overwrite=True)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_llama3_frequencies_match_transformers():
    """The scaled inverse frequencies themselves, against transformers' rope initialiser."""
    from jaxlm.model import rope_frequencies

    config = transformers.LlamaConfig(
        head_dim=64,
        hidden_size=256,
        num_attention_heads=4,
        rope_theta=500000.0,
        rope_scaling={**LLAMA3, "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    )
    init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"]
    want, _ = init(config, "cpu")
    got = rope_frequencies(32, 500000.0, (8.0, 1.0, 4.0, 8192))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6)
    plain = rope_frequencies(32, 500000.0)
    assert not np.allclose(np.asarray(got), np.asarray(plain))  # scaling changed some


BAD = [
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"sliding_window": 4096}, "sliding_window"),
    (
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
        "rope_parameters.rope_type",
    ),
    (
        {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
        "rope_scaling.rope_type",
    ),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"hidden_size": None}, "hidden_size"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f for _, f in BAD])
def test_unsupported_config_names_the_field(change, field):
    hf = json.loads(hf_model().config.to_json_string())
    hf.update(change)
    with pytest.raises(hf_config.ConvertError, match=field.replace(".", r"\.")):
        hf_config.to_jaxlm(hf)


def test_cli_reports_a_bias_tensor_and_a_bad_config(tmp_path, capsys):
    model = hf_model(attention_bias=True)
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(SystemExit, match="attention_bias"):
        convert.main([f"--from_hf={tmp_path / 'hf'}", f"--to={tmp_path / 'run'}"])
    # config.json that hides the biases: the tensors themselves are caught
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf["attention_bias"] = False
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(SystemExit, match=r"q_proj\.bias.*no place"):
        convert.main([f"--from_hf={tmp_path / 'hf'}", f"--to={tmp_path / 'run'}"])


def _json_tokenizer(directory):
    """A small byte-level BPE tokenizer.json with Llama 3's special tokens, made here."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=90,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|end_of_text|>",
            }
        )
    )
    return tok.get_vocab_size()


TEXT = "the lazy fox jumps over the quick dog"


def test_tokenizer_json_in_and_out(tmp_path):
    vocab = _json_tokenizer(tmp_path / "hf")
    hf_model(vocab=max(vocab, 97)).save_pretrained(tmp_path / "hf")
    convert.import_hf(tmp_path / "hf", tmp_path / "run")
    config = load_config(tmp_path / "run" / "config.py")
    assert config.data.tokenizer.endswith("tokenizer.json")
    # A fine-tune's starting point, not the pre-training defaults (256 x 4096 tokens per step).
    fields = (config.data.seq_len, config.train.global_batch_size, config.train.lr)
    assert fields == (1024, 8, 2e-5)
    assert "Set data.source to your data" in (tmp_path / "run" / "config.py").read_text()
    ours = tokenizer_lib.load(config.data.tokenizer)
    assert (ours.bos_id(), ours.eos_id()) == (0, 1)
    assert ours.vocab_size() == vocab

    convert.export_hf(tmp_path / "run", tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = ours.encode(TEXT)
    assert len(ids) > 1 and ours.decode(ids) == TEXT
    assert theirs(TEXT, add_special_tokens=False)["input_ids"] == ids
    assert ours.encode([TEXT, "fox"]) == [ids, theirs("fox", add_special_tokens=False)["input_ids"]]
    assert (theirs.bos_token_id, theirs.eos_token_id) == (0, 1)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["bos_token_id"] == 0


def test_sentencepiece_tokenizer_exports_for_auto_tokenizer(tmp_path, tokenizer_path):
    sp = tokenizer_lib.load(tokenizer_path)
    model = hf_model(vocab=sp.vocab_size())
    model.save_pretrained(tmp_path / "hf")
    shutil.copyfile(tokenizer_path, tmp_path / "hf" / "tokenizer.model")
    convert.import_hf(tmp_path / "hf", tmp_path / "run")
    convert.export_hf(tmp_path / "run", tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "def main():\n    return os.path.join(a, b)"
    assert theirs(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert theirs(text)["input_ids"][0] == sp.bos_id()


# Starts with spaces, with a newline, with both: where a Metaspace pre-tokenizer and
# sentencepiece's dummy prefix part ways; code, digits, bytes the vocabulary lacks.
TEXTS_ANY_TOKENIZER = [
    "def main():\n    return os.path.join(a, b)",
    "  two  spaces\n\nx",
    " lead",
    "\n\n  indented = 12345\n",
    "ünïcödé 😀\ttab",
    "x\n",
]

# Makes `import google.protobuf` fail, as in an environment with only transformers and
# sentencepiece installed.
NO_PROTOBUF = """
import sys
class NoProtobuf:
    def find_spec(self, name, path=None, target=None):
        if name == "google.protobuf" or name.startswith("google.protobuf."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoProtobuf())
"""


def test_export_loads_and_encodes_without_protobuf(tmp_path, tokenizer_path):
    sp = tokenizer_lib.load(tokenizer_path)
    hf_model(vocab=sp.vocab_size()).save_pretrained(tmp_path / "hf")
    shutil.copyfile(tokenizer_path, tmp_path / "hf" / "tokenizer.model")
    convert.import_hf(tmp_path / "hf", tmp_path / "run")
    convert.export_hf(tmp_path / "run", tmp_path / "out")
    for name in ("tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_PROTOBUF)
    load = (
        "import json, sys, transformers\n"
        "try:\n    import google.protobuf\n    sys.exit('protobuf was importable')\n"
        "except ImportError:\n    pass\n"
        f"t = transformers.AutoTokenizer.from_pretrained({str(tmp_path / 'out')!r})\n"
        f"texts = {TEXTS_ANY_TOKENIZER!r}\n"
        "print(json.dumps([t.bos_token_id, t.eos_token_id, [t(x)['input_ids'] for x in texts],"
        " [t.decode(t(x)['input_ids'], skip_special_tokens=True) for x in texts]]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    bos, eos, ids, decoded = json.loads(done.stdout.strip().splitlines()[-1])
    assert (bos, eos) == (sp.bos_id(), sp.eos_id())
    assert ids == [[sp.bos_id()] + sp.encode(text) for text in TEXTS_ANY_TOKENIZER]
    assert decoded == TEXTS_ANY_TOKENIZER


@pytest.mark.slow  # ~40 s on a 2-core CPU: tokenizing the built-in corpus, two compiles
def test_converted_model_trains_from_init_from(tmp_path, tokenizer_path):
    """lr 0: two steps through jaxlm.train leave the converted weights bit for bit (so
    init_from loaded them, not a fresh init); then the run exports back to the same model."""
    sp = tokenizer_lib.load(tokenizer_path)
    model = hf_model(vocab=sp.vocab_size(), kv=1)
    model.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    shutil.copyfile(tokenizer_path, tmp_path / "hf" / "tokenizer.model")
    convert.main([f"--from_hf={tmp_path / 'hf'}", f"--to={tmp_path / 'run'}"])
    config = load_config(tmp_path / "run" / "config.py")
    assert config.data.tokenizer == str(tmp_path / "run" / "tokenizer.model")
    config.data.seq_len, config.data.eval_batches = 32, 1
    config.train.update(steps=2, global_batch_size=8, lr=0.0, warmup_steps=0, log_every=1)
    last = train_lib.train(config, tmp_path / "finetune")
    assert np.isfinite(last["loss"]) and np.isfinite(last["val_loss"])

    convert.main([f"--from_run={tmp_path / 'finetune'}", f"--to_hf={tmp_path / 'out'}"])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    assert (tmp_path / "finetune" / "checkpoints" / "2").is_dir()


@pytest.mark.parametrize(
    "field,value",
    [("rope_scaling", "yarn"), ("rope_scaling_factor", 0.5), ("rope_low_freq_factor", 8.0)],
)
def test_rope_scaling_config_fields_are_validated(field, value):
    config = config_lib.default_config()
    config.model.rope_scaling = "llama3"
    config.model[field] = value
    with pytest.raises(config_lib.ConfigError, match=f"model.{field}"):
        config_lib.validate(config, 8)


def test_greedy_generation_equals_transformers_generate(tmp_path):
    """A converted model decodes (KV cache, jaxlm.generate) the same greedy tokens as
    transformers' own generate(do_sample=False), for prompts of different lengths in a batch."""
    from jaxlm import generate as generate_lib
    from jaxlm import run as run_lib

    model = hf_model(seed=3, vocab=300, kv=2, rope_scaling=LLAMA3)  # room for the tokenizer
    model.save_pretrained(tmp_path / "hf")
    _json_tokenizer(tmp_path / "hf")
    convert.import_hf(tmp_path / "hf", tmp_path / "run")
    run = run_lib.load(tmp_path / "run")
    prompts = [list(tokens_for(300, length=n, rows=1, seed=n)[0]) for n in (5, 11)]
    got = generate_lib.generate(
        run.params,
        run.config,
        prompts,
        max_new_tokens=12,
        temperature=0.0,
        **{**run.kwargs(), "eos_id": None},
    )
    model.generation_config.eos_token_id = None
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            want = model.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=12,
                min_new_tokens=12,
                pad_token_id=0,
            )[0, len(prompt) :]
        assert list(tokens) == want.tolist()


def test_cli_names_an_output_directory_that_is_a_file(tmp_path):
    """Checked before the run is read: a file where --to_hf's directory goes is one line."""
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(
        SystemExit, match=r"convert error: --to_hf=.*out is a file, not a directory"
    ):
        convert.main([f"--from_run={tmp_path / 'run'}", f"--to_hf={tmp_path / 'out'}"])
