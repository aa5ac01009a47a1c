"""DSpark drafters to and from DeepSpec's V4 layout (`python -m convert.drafter_export --to dspark / --to here`):
here → there → here bit-identical (gated pooling's extra tensors included), the names a release uses, strict
import."""

import json

import numpy as np
import pytest

from convert import drafter_export as dx
from hdflash_jax.safetensors_io import load_all, write_safetensors
from hdflash_jax.config import get_preset
from hdflash_jax.families import family
from hdflash_jax.dspark.config import DSparkConfig
from hdflash_jax.dspark.model import init_dspark
from test_convert import model_leaves

TCFG = get_preset("tiny")


@pytest.mark.parametrize("pooling", ["mean", "gated"])
def test_round_trip_bit_identical(tmp_path, capsys, pooling):
    dcfg = DSparkConfig(block_size=5, noise_token_id=511, target_layer_ids=(3, 4, 5), markov_rank=16,
                        n_routed_experts=4, n_activated_experts=2, pooling=pooling)
    src = family("dspark").save(tmp_path / "here", init_dspark(dcfg, TCFG, seed=4), dcfg)
    assert dx.main(["--to", "dspark", "--src", str(src), "--dst", str(tmp_path / "there"), "--target", "tiny"]) == 0
    names = set(load_all(tmp_path / "there" / "model.safetensors"))
    assert {"mtp.0.main_proj.weight", "mtp.0.main_norm.weight", "mtp.2.hc_head_fn", "mtp.2.norm.weight",
            "mtp.2.markov_head.markov_w1.weight", "mtp.2.markov_head.markov_w2.weight",
            "mtp.2.confidence_head.proj.weight", "mtp.1.attn.wq_a.weight", "mtp.1.hc_ffn_fn",
            "mtp.2.ffn.experts.3.w2.weight", "mtp.0.ffn.gate.bias"} <= names
    assert not any(n.startswith("mtp.") and n.split(".")[2] in ("enorm", "hnorm", "e_proj", "h_proj") for n in names)
    assert any(n.startswith("dspark_pool.") for n in names) == (pooling == "gated")
    conf = json.loads((tmp_path / "there" / "config.json").read_text())
    assert conf["dspark_block_size"] == 5 and conf["dspark_target_layer_ids"] == [3, 4, 5]
    assert dx.main(["--to", "here", "--src", str(tmp_path / "there"), "--dst", str(tmp_path / "back"),
                    "--target", "tiny"]) == 0
    cfg_back, back = family("dspark").load(tmp_path / "back", TCFG)
    _, orig = family("dspark").load(src, TCFG)
    assert cfg_back == dcfg
    a, b = model_leaves(orig), model_leaves(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_import_is_strict(tmp_path, capsys):
    dcfg = DSparkConfig(block_size=5, noise_token_id=511, target_layer_ids=(3, 4, 5), markov_rank=16)
    src = family("dspark").save(tmp_path / "here", init_dspark(dcfg, TCFG, seed=4), dcfg)
    assert dx.main(["--to", "dspark", "--src", str(src), "--dst", str(tmp_path / "there"), "--target", "tiny"]) == 0
    flat = load_all(tmp_path / "there" / "model.safetensors")
    flat["mtp.2.markov_head.markov_w2.weight"] = flat["mtp.2.markov_head.markov_w2.weight"][:, :8]
    write_safetensors(tmp_path / "there" / "model.safetensors", flat)
    capsys.readouterr()
    assert dx.main(["--to", "here", "--src", str(tmp_path / "there"), "--dst", str(tmp_path / "bad"),
                    "--target", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "'mtp.2.markov_head.markov_w2.weight'" in err or "markov_head.markov_w2" in err, err
    assert not (tmp_path / "bad").exists()
