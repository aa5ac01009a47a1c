"""Drafters in and out (convert.drafter_export): z-lab's DFlashDraftModel (code this project did not write) loads an
exported drafter strictly and computes the same draft logits; here → there → here is bit-identical; a drafter the
reference wrote itself imports and speculates losslessly in eval.run; bad inputs fail with one line naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
dflash_model = pytest.importorskip("dflash.model")

from flax import nnx  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import Qwen3Config  # noqa: E402

from convert import drafter_export as cli  # noqa: E402
from hdflash_jax.formats import zlab as ex  # noqa: E402
from hdflash_jax.formats import zlab_read as im  # noqa: E402
from hdflash_jax.config import DrafterConfig, get_preset  # noqa: E402
from hdflash_jax.deepseek_v4.layers import RMSNorm  # noqa: E402
from hdflash_jax.families import family  # noqa: E402
from hdflash_jax.drafter.model import init_draft_cache, init_drafter, make_draft_fn  # noqa: E402

V, D = 256, 64


def tiny_cfg(**kw) -> DrafterConfig:
    base = dict(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=96, block_size=4, mask_token_id=V - 1,
                conditioning="layers", target_layer_ids=(1, 3), reducer="linear", post_norm=False, dim=D,
                hc_mult=4, vocab_size=V, target_n_layers=6, dtype="float32", param_dtype="float32")
    base.update(kw)
    return DrafterConfig(**base)


def random_drafter(cfg: DrafterConfig, seed: int = 0):
    """A drafter with every parameter random, norms and gate included (a permutation error in q_norm/k_norm or a
    swapped gate tensor would not show on all-ones norms or zero biases)."""
    d = init_drafter(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    for _, m in nnx.iter_modules(d):
        if isinstance(m, RMSNorm):
            w = m.weight[...]
            m.weight[...] = jnp.asarray(1 + 0.2 * rng.standard_normal(w.shape), w.dtype)
    for name in ("base", "scale"):
        for _, m in nnx.iter_modules(d):
            if hasattr(m, name) and isinstance(getattr(m, name), nnx.Param):
                v = getattr(m, name)
                v[...] = jnp.asarray(1 + 0.5 * rng.standard_normal(v[...].shape), v[...].dtype)
    return d


def flat_numpy(drafter) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in ex.flat_params(drafter).items()}


def reference_model(folder: Path, cfg: DrafterConfig):
    """z-lab's DFlashDraftModel from the exported folder, loaded with strict=True. With hc_mult > 1 its `fc` is
    widened to K·n·D inputs first (speculators' DeepSeek-V4 layout; z-lab's class builds K·D)."""
    rcfg = Qwen3Config.from_json_file(str(folder / ex.CONFIG_FILE))
    model = dflash_model.DFlashDraftModel(rcfg).eval().to(torch.float32)
    if cfg.hc_mult > 1:
        model.fc = torch.nn.Linear(len(model.target_layer_ids) * cfg.hc_mult * cfg.dim, cfg.dim, bias=False)
    model.load_state_dict(load_file(str(folder / ex.WEIGHTS_FILE)), strict=True)
    assert model.block_size == cfg.block_size and model.mask_token_id == cfg.mask_token_id
    assert list(model.target_layer_ids) == list(cfg.layer_ids)
    return model


def compare_draft_logits(drafter, model, cfg: DrafterConfig, steps=(7, 3, 1, 4), seed=0, ref_features=None) -> float:
    """Several decode steps the way dflash_generate drives the reference: step s appends the features of the n_s
    newly committed positions and drafts B−1 slots after the anchor at `start`; the reference's draft cache is
    cropped to `start` after each call, as dflash_generate does. Returns the worst relative logit error."""
    rng = np.random.default_rng(seed)
    embed = rng.standard_normal((V, D)).astype(np.float32)
    head = (rng.standard_normal((V, D)) / np.sqrt(D)).astype(np.float32)
    feat_shape = (cfg.n_feature_layers, cfg.hc_mult, D)
    cache = init_draft_cache(cfg, 1, sum(steps) + 1)
    ref_cache = dflash_model._make_cache(model.config)
    start, worst, bs, pad = 0, 0.0, cfg.block_size, max(steps)
    graphdef, state = nnx.split(drafter)
    step_fn = make_draft_fn(graphdef)  # one compile: the new features padded to `pad` rows, n of them real
    for n in steps:
        feats = rng.standard_normal((1, n, *feat_shape)).astype(np.float32)
        padded = np.zeros((1, pad, *feat_shape), np.float32)
        padded[:, :n] = feats
        anchor = int(rng.integers(0, V - 1))
        _, logits, cache = step_fn(state, jnp.asarray(embed), jnp.asarray(head), jnp.asarray(padded),
                                   jnp.asarray([n], jnp.int32), jnp.asarray([anchor], jnp.int32), cache)
        start += n
        ids = torch.tensor([[anchor] + [cfg.mask_token_id] * (bs - 1)])
        with torch.no_grad():
            ref_in = feats.reshape(1, n, -1) if ref_features is None else ref_features(feats)
            hidden = model(target_hidden=torch.from_numpy(np.ascontiguousarray(ref_in)),
                           noise_embedding=torch.from_numpy(embed)[ids],
                           position_ids=torch.arange(start - n, start + bs)[None],
                           past_key_values=ref_cache, use_cache=True)[:, 1 - bs:, :]
            dflash_model._crop_to(ref_cache, start)
            ref = model.compute_logits(hidden, lambda h: h @ torch.from_numpy(head).T).numpy()
        got = np.asarray(logits)
        assert got.shape == ref.shape == (1, bs - 1, V)
        worst = max(worst, float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))))
    return worst


@pytest.mark.parametrize("hc_mult", [1, 4])
def test_exported_drafter_loads_strictly_into_reference_and_drafts_the_same_logits(tmp_path, hc_mult):
    cfg = tiny_cfg(hc_mult=hc_mult)
    drafter = random_drafter(cfg)
    src = family("block").save(tmp_path / "here", drafter, drafter.cfg)
    res = family("block").export("zlab", src, tmp_path / "zlab")
    assert res["gate_tensors"] == [] and res["tensors"] == 2 * 11 + 3
    conf = json.loads((tmp_path / "zlab" / ex.CONFIG_FILE).read_text())
    assert conf["dflash_config"] == {"block_size": 4, "mask_token_id": V - 1, "target_layer_ids": [1, 3]}
    if hc_mult == 1:  # what a user does; the reference class holds the drafter exactly
        model, info = dflash_model.DFlashDraftModel.from_pretrained(str(tmp_path / "zlab"), output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    model = reference_model(tmp_path / "zlab", cfg)
    err = compare_draft_logits(drafter, model, cfg)
    assert err <= 1e-5, err


def test_rope_permutation_is_what_the_reference_rotates():
    """Independent of the drafter: rotating interleaved pairs then permuting equals permuting then rotate_half."""
    from transformers.models.qwen3.modeling_qwen3 import rotate_half

    hd, pos = 16, 5.0
    x = np.random.default_rng(0).standard_normal(hd)
    theta = 10000.0 ** (-np.arange(0, hd, 2) / hd)
    c, s = np.cos(pos * theta), np.sin(pos * theta)
    inter = np.empty(hd)
    inter[0::2] = x[0::2] * c - x[1::2] * s
    inter[1::2] = x[0::2] * s + x[1::2] * c
    p = ex.rope_permutation(hd)
    xt = torch.from_numpy(x[p])
    half = (xt * torch.from_numpy(np.concatenate([c, c])) + rotate_half(xt) * torch.from_numpy(np.concatenate([s, s])))
    np.testing.assert_allclose(inter[p], half.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kw", [
    dict(),  # vanilla DFlash
    dict(conditioning="final_streams", target_layer_ids=None, reducer="gated", post_norm=True),  # HyperDFlash
    dict(conditioning="layers", target_layer_ids=(0, 2, 5), reducer="gated", post_norm=True,
         dtype="bfloat16", param_dtype="bfloat16"),
    dict(conditioning="final_streams", target_layer_ids=None, reducer="linear"),
])
def test_round_trip_here_there_here_is_bit_identical(tmp_path, kw):
    cfg = tiny_cfg(**kw)
    drafter = random_drafter(cfg, seed=3)
    src = family("block").save(tmp_path / "a", drafter, drafter.cfg)
    res = family("block").export("zlab", src, tmp_path / "z")
    assert bool(res["gate_tensors"]) == (cfg.reducer == "gated")
    assert cli.main(["--to", "here", "--src", str(tmp_path / "z"), "--dst", str(tmp_path / "b")]) == 0
    cfg2, back = family("block").load(tmp_path / "b")
    assert cfg2 == cfg
    a, b = flat_numpy(drafter), flat_numpy(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


# ---- strict import -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    cfg = tiny_cfg()
    drafter = random_drafter(cfg)
    family("block").export("zlab", family("block").save(root / "here", drafter, drafter.cfg), root / "zlab")
    return root / "zlab"


def _broken(exported: Path, tmp_path: Path, edit_config=None, edit_tensors=None) -> Path:
    import shutil

    from hdflash_jax.safetensors_io import load_all, write_safetensors

    out = tmp_path / "broken"
    shutil.copytree(exported, out)
    if edit_config:
        c = json.loads((out / ex.CONFIG_FILE).read_text())
        edit_config(c)
        (out / ex.CONFIG_FILE).write_text(json.dumps(c))
    if edit_tensors:
        t = load_all(out / ex.WEIGHTS_FILE)
        edit_tensors(t)
        write_safetensors(out / ex.WEIGHTS_FILE, t)
    return out


def _no_block(c):
    del c["dflash_config"]["block_size"]


def _rename(t):
    t["fc.weights"] = t.pop("fc.weight")


@pytest.mark.parametrize("config_edit, tensor_edit, message", [
    (_no_block, None, "config.json: dflash_config.block_size missing (the reference would silently use 16"),
    (lambda c: c["dflash_config"].update(mask_token_id=V), None, "config.json: DrafterConfig.mask_token_id"),
    (lambda c: c["dflash_config"].update(target_layer_ids=[1, 6]), None, "target_layer_ids=[1, 6]"),
    (lambda c: c["rope_parameters"].update(rope_type="yarn"), None, "rope_parameters.rope_type='yarn'"),
    (lambda c: c[ex.EXT].update(rope="interleaved"), None, "hdflash.rope='interleaved'"),
    (lambda c: c.update(architectures=["DFlash2DraftModel"]), None, "DFlash2"),
    (lambda c: c.update(attention_bias=True), None, "attention_bias"),
    (lambda c: c.update(eagle_aux_hidden_state_layer_ids=[1, 3]), None, "eagle_aux_hidden_state_layer_ids=[1, 3]"),
    (lambda c: c.update(target_hidden_size=D), None, "target_hidden_size=64 disagrees with fc.weight"),
    (lambda c: c.update(is_neox_style=False), None, "is_neox_style=False: expected true"),
    (None, _rename, "model.safetensors: unexpected tensor 'fc.weights'"),
    (None, lambda t: t.update({"lm_head.weight": np.zeros((V, D), np.float32)}), "embedding/head copy"),
    (None, lambda t: t.pop("layers.1.self_attn.k_norm.weight"), "tensor 'layers.1.self_attn.k_norm.weight' missing"),
    (None, lambda t: t.update({"fc.weight": t["fc.weight"][:, :-D]}), "'fc.weight' has shape (64, 448)"),
    (None, lambda t: t["norm.weight"].__setitem__(3, np.nan), "tensor 'norm.weight' holds NaN or Inf"),
])
def test_import_errors_name_the_file_and_key(exported, tmp_path, capsys, config_edit, tensor_edit, message):
    src = _broken(exported, tmp_path, config_edit, tensor_edit)
    dst = tmp_path / "out"
    assert cli.main(["--to", "here", "--src", str(src), "--dst", str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and str(src) in err, err
    assert not dst.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_import_checks_the_target(exported, tmp_path, capsys):
    rc = cli.main(["--to", "here", "--src", str(exported), "--dst", str(tmp_path / "d"), "--target", "tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and "vocab_size=256, the target has 512" in err and str(exported) in err, err
    assert not (tmp_path / "d").exists()


def test_export_refuses_existing_destination(exported, tmp_path, capsys):
    (tmp_path / "x").mkdir()
    rc = cli.main(["--to", "here", "--src", str(exported), "--dst", str(tmp_path / "x")])
    assert rc == 2 and "destination exists" in capsys.readouterr().err


# ---- a drafter the reference wrote itself, through eval.run --------------------------------------------------------

def test_reference_written_drafter_imports_and_speculates_losslessly_in_eval_run(tmp_path, capsys):
    """DFlashDraftModel.save_pretrained (the reference's own writer) → import → eval.run on the tiny target: greedy
    speculative output equals AR (eval.run checks it and exits 3 otherwise)."""
    import eval.run as ev

    t = get_preset("tiny")
    torch.manual_seed(0)
    rcfg = Qwen3Config(hidden_size=t.dim, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, intermediate_size=96, vocab_size=t.vocab_size, num_target_layers=t.n_layers,
                       rms_norm_eps=t.norm_eps, dflash_config={"block_size": 4, "mask_token_id": t.vocab_size - 1,
                                                              "target_layer_ids": [1, 3]})
    model = dflash_model.DFlashDraftModel(rcfg)
    model.fc = torch.nn.Linear(2 * t.hc_mult * t.dim, t.dim, bias=False)  # DeepSeek-V4 streams: [D, K·n·D]
    model.save_pretrained(str(tmp_path / "ref"))
    assert cli.main(["--to", "here", "--src", str(tmp_path / "ref"), "--dst", str(tmp_path / "imp"),
                    "--target", "tiny"]) == 0
    cfg, _ = family("block").load(tmp_path / "imp")
    assert (cfg.conditioning, cfg.reducer, cfg.layer_ids, cfg.hc_mult, cfg.block_size) == (
        "layers", "linear", (1, 3), t.hc_mult, 4)
    out = tmp_path / "eval"
    import jax

    prev = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)  # AR and the drafter compiled alike: half the time
    try:
        rc = ev.main(["--target", "tiny-random", "--suite", "gsm8k", "--method", "dflash", "--drafter",
                      f"dflash={tmp_path / 'imp'}", "--limit", "1", "--max-new-tokens", "8", "--prompt-buckets",
                      "512", "--quiet", "--out", str(out)])
    finally:
        jax.config.update("jax_disable_most_optimizations", prev)
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "results.json").read_text())
    assert r["suites"]["gsm8k"]["dflash"]["greedy_match_ar"] is True


# ---- z-lab's own decode loop with a transformers DeepSeek-V4 target -------------------------------------------------

SMALL = Path(__file__).resolve().parents[1] / "models" / "small"


def hf_from_project(target):
    """transformers' DeepseekV4ForCausalLM holding this project's target weights (the inverse of the converter's
    name map: hdflash_jax.keymap's transformers → official → tree, walked backwards per transformers key)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from hdflash_jax.keymap import hf_memory_to_official, official_to_tree

    flat = {k: np.asarray(v) for k, v in ex.flat_params(target).items()}
    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**target.cfg.to_hf_dict())).eval().to(torch.float32)

    def leaf(official):
        path, expert = official_to_tree(official)
        return flat[path] if expert is None else flat[path][expert]

    state = {}
    for name, ref in hf.state_dict().items():
        official = hf_memory_to_official(name)
        if official.endswith(".ffn.experts.gate_up_proj"):
            p = official[: -len(".gate_up_proj")]
            v = np.stack([np.concatenate([leaf(f"{p}.{e}.w1.weight"), leaf(f"{p}.{e}.w3.weight")])
                          for e in range(ref.shape[0])])
        elif official.endswith(".ffn.experts.down_proj"):
            p = official[: -len(".down_proj")]
            v = np.stack([leaf(f"{p}.{e}.w2.weight") for e in range(ref.shape[0])])
        else:
            v = leaf(official)
        assert tuple(v.shape) == tuple(ref.shape), name
        state[name] = torch.from_numpy(np.array(v)).to(ref.dtype)  # a writable copy
    hf.load_state_dict(state, strict=True)
    return hf


class RecomputingTarget(torch.nn.Module):
    """transformers' DeepSeek-V4 seen the way dflash_generate expects a Qwen-style target. Two adaptations, both
    outside the drafter: every hidden_states entry [B, T, n, D] is flattened stream-major to [B, T, n·D] (so
    extract_context_feature concatenates layers of vec(streams)); and V4's compressed-attention caches cannot be
    cropped the way dflash_generate rolls back (DynamicCache.crop), so each call recomputes the whole sequence from
    the tokens committed so far (exact: the same tokens give the same logits) and puts one placeholder entry per
    token in the cache it is handed, so that dflash_generate's crops keep the cache length = the committed length
    (checked at every call)."""

    def __init__(self, hf, cache_config):
        super().__init__()
        self.hf, self.config, self.seen = hf, cache_config, torch.zeros((1, 0), dtype=torch.long)
        self.lm_head = hf.lm_head

    @property
    def device(self):
        return torch.device("cpu")

    def get_input_embeddings(self):
        return self.hf.get_input_embeddings()

    def forward(self, input_ids, position_ids, past_key_values=None, use_cache=True, logits_to_keep=0,
                output_hidden_states=False):
        start, t = int(position_ids[0, 0]), input_ids.shape[1]
        assert past_key_values.get_seq_length() == start
        for i in range(len(past_key_values.layers)):
            past_key_values.update(torch.zeros(1, 1, t, 1), torch.zeros(1, 1, t, 1), i)
        self.seen = torch.cat([self.seen[:, :start], input_ids], dim=1)
        out = self.hf(self.seen, output_hidden_states=True)
        logits = out.logits[:, -t:]
        hidden = [h[:, -t:].flatten(2) if h.dim() == 4 else h[:, -t:] for h in out.hidden_states]
        from types import SimpleNamespace

        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits, hidden_states=hidden)


@pytest.mark.slow  # ≈ 4 min on 2 busy cores: transformers' V4 recomputed per call, greedy AR, one compile
def test_zlab_dflash_generate_with_transformers_target_matches_this_decoder(tmp_path, monkeypatch):
    """The built-in small model's trained DFlash drafter, exported, drives z-lab's `dflash_generate` over
    transformers' DeepSeek-V4 holding the same target weights: the same greedy tokens as this project's
    speculative decoder (and as greedy AR) and the same number of tokens committed at every verify step."""
    from hdflash_jax.checkpoint import load_params
    from hdflash_jax.decode.drafters import BlockDrafterAdapter
    from hdflash_jax.decode.generate import DecodeSettings, Generator
    from hdflash_jax.deepseek_v4.model import forward_full

    if not (SMALL / "drafters" / "dflash").is_dir():
        pytest.skip("models/small not built")
    tcfg, target = load_params(SMALL / "target")
    dcfg, drafter = family("block").load(SMALL / "drafters" / "dflash", tcfg)
    family("block").export("zlab", SMALL / "drafters" / "dflash", tmp_path / "z")
    model = reference_model(tmp_path / "z", dcfg)
    hf = hf_from_project(target)
    prompt = [0, 2, *range(40, 72), 3]  # bos, then ids of the small vocabulary
    with torch.no_grad():
        ref_logits = hf(torch.tensor([prompt])).logits.numpy()
    ours = np.asarray(forward_full(target, jnp.asarray([prompt])).logits)
    assert np.max(np.abs(ours - ref_logits)) / np.max(np.abs(ref_logits)) < 1e-4

    n_new = 40
    import time

    monkeypatch.setattr(dflash_model, "_cuda_time", time.perf_counter)  # its stats timer syncs CUDA; CPU here
    t0 = time.perf_counter()
    res = dflash_model.dflash_generate(model, RecomputingTarget(hf, model.config), torch.tensor([prompt]),
                                       max_new_tokens=n_new, stop_token_ids=None, temperature=0.0,
                                       return_stats=True)
    theirs = res.output_ids[0, len(prompt):].tolist()
    print(f"dflash_generate {time.perf_counter() - t0:.1f}s; committed per step {res.acceptance_lengths}")
    gen = Generator(target, BlockDrafterAdapter(dcfg, dcfg.block_size - 1), drafter,
                    settings=DecodeSettings(max_new_tokens=n_new, prompt_buckets=(64,)))
    out = gen.generate([prompt])
    mine = out.row_tokens(0)
    print(f"this decoder {time.perf_counter() - t0:.1f}s")
    with torch.no_grad():  # greedy AR with transformers, one token at a time from scratch
        seq = list(prompt)
        for _ in range(n_new):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    assert theirs == mine == seq[len(prompt):]
    committed = [int(a) + 1 for a in out.accepted[:, 0] if a >= 0]
    assert res.acceptance_lengths[:-1] == committed[: len(res.acceptance_lengths) - 1]
    assert sum(committed) >= n_new - 1 and max(committed) > 1, committed  # the drafter really speculates


def test_interleaved_rope_file_imports_without_permutation(exported, tmp_path):
    """A file that says is_neox_style: false (vLLM's flag for interleaved RoPE) holds q/k rows in this project's
    order: un-permuted back by hand, it imports to the very parameters the export came from."""
    def interleave(t):
        for key in list(t):
            if key.endswith(("q_proj.weight", "k_proj.weight", "q_norm.weight", "k_norm.weight")):
                inv = np.argsort(ex.rope_permutation(16))
                w = t[key]
                t[key] = np.ascontiguousarray(w[inv] if w.ndim == 1 else w.reshape(-1, 16, w.shape[1])[:, inv].reshape(
                    w.shape))

    def plain(c):
        del c[ex.EXT]
        c["is_neox_style"] = False

    src = _broken(exported, tmp_path, plain, interleave)
    _, a = im.read_zlab(exported)
    cfg, b = im.read_zlab(src)
    assert cfg.conditioning == "layers" and cfg.hc_mult == 4
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_mean_pooled_reference_drafter_imports_exactly(tmp_path, capsys):
    """z-lab's class as is (fc [D, K·D]) for a 4-stream target: the layout of a drafter fed per-layer stream means
    (vLLM's DeepSeek-V4 aux hidden states). Without --stream-pooling the import refuses and says why; with
    `mean` the imported drafter on flattened streams drafts what the reference drafts on their means."""
    t = get_preset("tiny")
    torch.manual_seed(1)
    rcfg = Qwen3Config(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, intermediate_size=96, vocab_size=V, num_target_layers=6,
                       dflash_config={"block_size": 4, "mask_token_id": V - 1, "target_layer_ids": [1, 3]})
    model = dflash_model.DFlashDraftModel(rcfg).eval().to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "ref"))
    tiny_v = t.replace(vocab_size=V)  # the tiny target's streams and depth, this test's vocabulary
    with pytest.raises(im.ExportError, match="--stream-pooling mean"):
        im.read_zlab(tmp_path / "ref", target_cfg=tiny_v)
    with pytest.raises(im.ExportError, match="needs --target"):
        im.read_zlab(tmp_path / "ref", stream_pooling="mean")
    res = family("block").import_folder("zlab", tmp_path / "ref", tmp_path / "imp", target_cfg=tiny_v,
                                        stream_pooling="mean")
    cfg, drafter = family("block").load(res["dst"], tiny_v)
    assert cfg.hc_mult == t.hc_mult == 4
    err = compare_draft_logits(drafter, model, cfg, ref_features=lambda f: f.mean(axis=3).reshape(1, f.shape[1], -1))
    assert err <= 1e-5, err
