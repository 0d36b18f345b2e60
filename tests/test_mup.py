"""muP (jaxlm.mup): at the base width it is sp but for the attention scale; its init, learning
rate and logits multipliers by width; export folds them so transformers gives the same logits;
the coordinate check (activations flat across widths under muP, growing under sp)."""

import copy
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import mup_coord_check
from jaxlm import config as config_lib
from jaxlm import convert, mup, optim
from jaxlm.model import ModelConfig, Transformer
from tests.support import small_config


def _model_config(d_model=64, **changes):
    return ModelConfig(
        vocab_size=128, d_model=d_model, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=16, d_ff=2 * d_model, **changes,
    )  # fmt: skip


def _init(cfg, seed=0):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return nn.meta.unbox(Transformer(cfg).init(jax.random.key(seed), tokens)["params"])


def test_mup_at_the_base_width_is_sp_but_for_the_attention_scale():
    sp, mp = _model_config(), _model_config(parametrization="mup", mup_base_width=64)
    params = _init(sp)
    jax.tree.map(np.testing.assert_array_equal, params, _init(mp))  # the same init
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 16)))
    got = Transformer(mp).apply({"params": params}, tokens)
    # sp with the queries' kernel times 1/sqrt(head_dim): scores q.k / head_dim
    scaled = copy.deepcopy(jax.device_get(params))
    scaled["layers"]["attn"]["q"] = scaled["layers"]["attn"]["q"] / np.sqrt(16)
    want = Transformer(sp).apply({"params": scaled}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    plain = Transformer(sp).apply({"params": params}, tokens)
    assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 1e-3  # the scale does matter


def test_mup_scales_hidden_init_and_learning_rate_by_base_over_width():
    cfg = _model_config(d_model=256, parametrization="mup", mup_base_width=64)  # ratio 1/4
    params = _init(cfg)
    stds = {k: float(np.std(v)) for k, v in params["layers"]["attn"].items()}
    assert stds["q"] == pytest.approx(0.02 * 0.5, rel=0.05)  # std x sqrt(1/4)
    assert float(np.std(params["embedding"])) == pytest.approx(0.02, rel=0.05)
    assert float(np.std(params["head"])) == pytest.approx(0.02, rel=0.05)
    t = small_config().train
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.01, params)
    sp_tx, mup_tx = (
        optim.make_optimizer(t),
        optim.make_optimizer(t, hidden_lr_ratio=mup.ratio_of(cfg)),
    )
    sp_up, _ = sp_tx.update(grads, sp_tx.init(params), params)
    mup_up, _ = mup_tx.update(grads, mup_tx.init(params), params)
    for path, a in jax.tree_util.tree_leaves_with_path(sp_up):
        b = mup_up
        for key in path:
            b = b[key.key]
        hidden = path[-1].key in mup.HIDDEN
        np.testing.assert_allclose(np.asarray(b), np.asarray(a) * (0.25 if hidden else 1.0))


def test_a_bad_parametrization_is_one_line_naming_the_field():
    config = small_config()
    config.model.parametrization = "ntk"
    with pytest.raises(config_lib.ConfigError, match=r"model.parametrization='ntk'"):
        config_lib.validate(config, 8)
    config.model.parametrization, config.model.tie_embeddings = "mup", True
    with pytest.raises(config_lib.ConfigError, match=r"model.tie_embeddings=True"):
        config_lib.validate(config, 8)


def test_export_folds_the_multipliers_so_transformers_gives_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.test_convert import hf_logits, hf_model, tokens_for

    hf_dir, run_dir = tmp_path / "hf", tmp_path / "run"
    hf_model(kv=2).save_pretrained(hf_dir)
    convert.import_hf(hf_dir, run_dir)
    params, meta, _ = convert.read_run(run_dir)
    meta = copy.deepcopy(meta)
    meta["config"]["model"].update(parametrization="mup", mup_base_width=16)  # width 32
    mup_run = tmp_path / "mup_run"
    convert.save_params(mup_run / "checkpoints", params, meta)
    config = config_lib.default_config()
    config.model.update(meta["config"]["model"])
    cfg = config_lib.model_config(config, config_lib.validate(config, jax.device_count()))
    assert cfg.parametrization == "mup" and mup.ratio_of(cfg) == 0.5
    tokens = tokens_for(97)
    got = np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(tokens)))
    sp_cfg = dataclasses.replace(cfg, parametrization="sp")
    plain = np.asarray(Transformer(sp_cfg).apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(plain - got).max() > 1e-2  # muP's multipliers change these logits

    convert.export_hf(mup_run, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", dtype=torch.float32
    ).eval()
    np.testing.assert_allclose(hf_logits(reloaded, tokens), got, atol=1e-5, rtol=0)


@pytest.mark.slow  # four widths up to 512, two parametrizations, a few Adam steps each
def test_coordinate_check_activations_stay_flat_under_mup_and_grow_under_sp():
    widths = (64, 128, 256, 512)
    for name, flat in (("mup", True), ("sp", False)):
        sizes = [mup_coord_check.activation_sizes(name, w)[-1] for w in widths]
        growth = {k: sizes[-1][k] / sizes[0][k] for k in sizes[0]}
        print(name, growth)
        if flat:
            assert all(g < 2.0 for g in growth.values()), (name, growth)
        else:
            assert growth["logits"] > 2.0, (name, growth)
