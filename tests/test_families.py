"""Every registered drafter family through the same checks, so a family is tested the day it is registered: what a
block size means, the checkpoint round trip (save, recognise, load bit-identical), greedy speculative decoding
equal to AR, and the export round trip for each of its serving formats. The toy family of tests/toy_family.py
(written by following docs/adding_a_drafter_family.md) is registered here and runs through the same checks."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import toy_family  # noqa: F401 — registers "toy-bigram", as a new family's module would
from hdflash_jax.config import get_preset
from hdflash_jax.decode.drafters import ReplayTokens
from hdflash_jax.decode.generate import DecodeSettings, Generator
from hdflash_jax.deepseek_v4.model import init_target
from hdflash_jax.families import checkpoint_family, families, family, family_of, format_of_folder, unregister

TCFG = get_preset("tiny", n_layers=3, n_hash_layers=1, compress_ratios=(0, 4, 0, 0))
NAMES = [f.name for f in families()]
PROMPTS = [[5, 9, 23, 7, 41, 3], [17, 2, 88, 60]]
NEW = 12


def teardown_module():
    unregister("toy-bigram")


@pytest.fixture(scope="module")
def target():
    return nnx.jit(lambda: init_target(TCFG, seed=3))()


@pytest.fixture(scope="module")
def ar_tokens(target):
    res = Generator(target, settings=DecodeSettings(max_new_tokens=NEW, prompt_buckets=(16,))).generate(PROMPTS)
    return [res.row_tokens(r) for r in range(len(PROMPTS))]


def params_of(module) -> dict:
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in flat}


def test_the_toy_family_is_registered_like_the_others():
    assert "toy-bigram" in NAMES and {"ar", "replay", "mtp", "block", "dspark"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_what_a_block_size_means(name):
    fam = family(name)
    cfg = fam.example_config(TCFG)
    k = fam.num_drafts(cfg, None)
    assert isinstance(k, int) and k >= 0
    for b in (2, 5):  # a verify width set by the user (--block-size): B − 1 drafts, or the family's own (MTP's chain)
        assert fam.num_drafts(cfg, b) in (b - 1, k)
    if fam.config_cls is not None:
        assert family_of(cfg) is fam


@pytest.mark.parametrize("name", [n for n in NAMES if family(n).config_file])
def test_checkpoint_round_trip(name, target, tmp_path):
    fam = family(name)
    cfg = fam.example_config(TCFG)
    fam.check_target(cfg, TCFG, where="test")
    module = fam.init(cfg, target, seed=1)
    path = fam.save(tmp_path / "ckpt", module, cfg)
    assert checkpoint_family(path) is fam
    assert all(not f.is_checkpoint(path) for f in families() if f is not fam)
    cfg2, back = fam.load(path, TCFG)
    assert cfg2 == cfg
    a, b = params_of(module), params_of(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError):
        fam.save(path, module, cfg)  # never replaced without overwrite


@pytest.mark.parametrize("name", NAMES)
def test_greedy_speculative_decoding_equals_ar(name, target, ar_tokens):
    """Whatever the family drafts, greedy speculative decoding gives AR's tokens (the acceptance rule is exact)."""
    fam = family(name)
    cfg = fam.example_config(TCFG)
    if fam.config_file:
        modules = fam.init(cfg, target, seed=1)
    elif fam.replays_reference:  # the replay ceiling: AR's own answer as the reference
        modules = ReplayTokens.of_answers(PROMPTS, ar_tokens, 16 + NEW + 8)
    else:
        modules = fam.decode_modules(cfg)
    k = fam.num_drafts(cfg, None)
    gen = Generator(target, fam.adapter(cfg, k, 0.0), modules,
                    settings=DecodeSettings(max_new_tokens=NEW, prompt_buckets=(16,)))
    res = gen.generate(PROMPTS)
    assert [res.row_tokens(r) for r in range(len(PROMPTS))] == ar_tokens, name
    if fam.replays_reference and k:
        assert res.stats.tau > 1  # the negative control of the comparison: the drafts were really used


@pytest.mark.parametrize("name, fmt", [(f.name, x) for f in families() for x in f.formats])
def test_export_round_trip(name, fmt, target, tmp_path):
    fam = family(name)
    cfg = fam.example_config(TCFG)
    src = fam.save(tmp_path / "here", fam.init(cfg, target, seed=2), cfg)
    try:
        summary = fam.export(fmt, src, tmp_path / "there", target_cfg=TCFG)
    except ValueError as e:  # a format that cannot hold this drafter says so before writing (its own tests cover it)
        assert not (tmp_path / "there").exists()
        pytest.skip(f"{fmt} cannot hold the family's example drafter: {e}")
    assert summary["tensors"] > 0
    assert format_of_folder(tmp_path / "there")[1].name == fmt
    fam.import_folder(fmt, tmp_path / "there", tmp_path / "back", target_cfg=TCFG)
    cfg2, back = fam.load(tmp_path / "back", TCFG)
    _, orig = fam.load(src, TCFG)
    assert cfg2 == cfg
    a, b = params_of(orig), params_of(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_negative_control_a_wrong_drafter_is_caught(target, tmp_path):
    """The checks above can fail: a checkpoint loaded with another family's config is refused, and a drafter
    built for another vocabulary is refused by its family's one compatibility rule."""
    fam = family("toy-bigram")
    cfg = fam.example_config(TCFG)
    path = fam.save(tmp_path / "toy", fam.init(cfg, target), cfg)
    with pytest.raises((OSError, ValueError)):
        family("block").load(path, TCFG)
    bad = cfg.__class__(TCFG.vocab_size + 1)
    with pytest.raises(ValueError, match="vocab_size"):
        fam.check_target(bad, TCFG, where="test")
