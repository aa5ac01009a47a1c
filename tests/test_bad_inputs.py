"""Bad inputs, one table: every row must end in ONE `error:` line that names the file and the key/field, a
non-zero exit (or the loader's exception), no traceback, nothing left at the destination and every input
byte-identical afterwards (checksums of the whole working folder before and after).

The CLIs run in-process (`main(argv)` with capsys) on one tiny 2-layer official checkpoint shared by the module;
a handful of rows also run as real processes to prove the entry points print no traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
import pytest

from convert import torch_to_flax as t2f
from convert.quant import quantize_fp8_block
from hdflash_jax.safetensors_io import write_index, write_safetensors
from hdflash_jax.checkpoint import abstract_leaves, load_params
from hdflash_jax.config import get_preset
from hdflash_jax.keymap import tree_to_official

REPO = Path(__file__).resolve().parents[1]
WKV = "layers.1.attn.wkv.weight"  # a plain fp32 tensor whose official name is its tree path
FP8 = "layers.0.attn.wq_a"  # the FP8 weight + e8m0 scale pair


def tiny_cfg():
    return get_preset("tiny", n_layers=2, n_hash_layers=1, compress_ratios=(0, 4, 0))


def official_tensors(cfg, seed: int = 3) -> dict[str, np.ndarray]:
    """Random official-named tensors for every leaf (fp32, int32 tid2eid, one FP8 pair)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, var in abstract_leaves(cfg).items():
        shape = tuple(var.shape)
        stacked = path.endswith(("experts.w1", "experts.w2", "experts.w3"))
        names = tree_to_official(path, cfg.n_routed_experts)
        if path.endswith("tid2eid"):
            v = np.argsort(rng.random((shape[0], cfg.n_routed_experts)), 1)[:, : shape[1]].astype(np.int32)
        else:
            v = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if stacked:
            out.update({n: v[e] for e, n in enumerate(names)})
        else:
            out[names[0]] = v
    out[f"{FP8}.weight"], out[f"{FP8}.scale"] = quantize_fp8_block(out[f"{FP8}.weight"])
    return out


@dataclasses.dataclass
class Base:
    src: Path  # official checkpoint: model.safetensors + config.json
    tensors: dict[str, np.ndarray]
    nan_ckpt: Path  # converted with --allow-nonfinite: parameter WKV holds a NaN
    nan_drafter: Path  # a drafter checkpoint whose one parameter holds an Inf
    nan_drafter_key: str


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    from flax import nnx

    from hdflash_jax.config import get_drafter_preset
    from hdflash_jax.families import family
    from hdflash_jax.drafter.model import init_drafter

    root = tmp_path_factory.mktemp("bad_inputs")
    cfg = tiny_cfg()
    tensors = official_tensors(cfg)
    src = root / "ckpt"
    src.mkdir()
    write_safetensors(src / "model.safetensors", tensors)
    d = cfg.to_dict()
    d.update(dtype="fp8", scale_fmt="ue8m0", expert_dtype="fp4")  # as DeepSeek's inference/config.json says
    (src / "config.json").write_text(json.dumps(d))
    # a converted checkpoint with a NaN (the converter lets it through only when told to)
    nan_src = root / "nan_src"
    shutil.copytree(src, nan_src)
    t = dict(tensors)
    t[WKV] = t[WKV].copy()
    t[WKV][0, 0] = np.nan
    write_safetensors(nan_src / "model.safetensors", t)
    nan_ckpt = root / "nan_ckpt"
    report = t2f.convert(nan_src, nan_ckpt, dtype="fp32", allow_nonfinite=True, progress=False, log=lambda *_: 0)
    assert report["nonfinite_values"] == 1 and report["nonfinite_tensors"] == {WKV: 1}
    # a drafter with an Inf
    dcfg = get_drafter_preset("tiny-hyperdflash")
    flat = {".".join(map(str, p)): np.array(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(init_drafter(dcfg)))}
    key = sorted(k for k, v in flat.items() if v.dtype.kind == "f" and v.ndim == 2)[0]
    flat[key][0, 0] = np.inf
    nan_drafter = family("block").save(root / "nan_drafter", flat, dcfg)
    return Base(src, tensors, nan_ckpt, nan_drafter, key)


# ---- the world one row runs in ------------------------------------------------------------------------------

@dataclasses.dataclass
class World:
    root: Path
    base: Base

    def __post_init__(self):
        self.src = self.root / "src"
        shutil.copytree(self.base.src, self.src)
        self.dst = self.root / "out"
        self.chdir: Path | None = None  # the folder the command runs in (default: unchanged)
        self.file = self.src / "model.safetensors"
        self.config = self.src / "config.json"

    def tensors(self, edit) -> None:
        """Rewrite the source's one shard with `edit(tensors)` applied."""
        t = dict(self.base.tensors)
        edit(t)
        write_safetensors(self.file, t)

    def config_dict(self, edit) -> None:
        d = json.loads(self.config.read_text())
        edit(d)
        self.config.write_text(json.dumps(d))

    def hf_config(self, **changes) -> None:
        d = {"model_type": "deepseek_v4", **tiny_cfg().to_hf_dict(), **changes}
        self.config.write_text(json.dumps(d))

    def target_ckpt(self, config_text: str | None = None) -> Path:
        """A (fake) params checkpoint folder whose config.json is `config_text` (weights never read)."""
        p = self.root / "target"
        (p / "params").mkdir(parents=True)
        (p / "config.json").write_text(config_text if config_text is not None else
                                       json.dumps(tiny_cfg().to_dict()))
        return p

    def copy(self, path: Path, name: str) -> Path:
        shutil.copytree(path, self.root / name)
        return self.root / name

    def names(self) -> dict:
        return dict(src=self.src, dst=self.dst, file=self.file, config=self.config, root=self.root,
                    drafter_key=self.base.nan_drafter_key)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root → sha256 of its bytes ('dir' / 'link:<target>' otherwise); symlinks not followed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nothing can be created in, also for root (chmod, then the immutable attribute)."""
    d = tmp_path / "world" / "ro"
    d.mkdir(parents=True)
    d.chmod(0o555)
    immutable = False
    if os.access(d, os.W_OK):  # root ignores the mode bits
        immutable = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
        if not immutable:
            d.chmod(0o755)
            pytest.skip("cannot make a read-only folder here (root without chattr)")
    yield d
    if immutable:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    d.chmod(0o755)


# ---- the table ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    tool: str  # convert | eval | train | pretrain | regenerate | load_params | load_drafter
    make: Callable[[World], list[str]]  # builds the bad input, returns argv (loaders: [path])
    needles: tuple[str, ...]  # must be in the error line; {src} {dst} {file} {config} {root} are filled in
    rc: int | str = 1  # exit status, or the loader's exception class name
    absent: tuple[str, ...] = ()  # must be nowhere in the output
    real_process: bool = False  # also run as a real process (no traceback from the entry point)


def _hyperdflash2(w: World) -> Path:
    """A HyperDFlash-2 checkpoint (the DFlash 2 family on the final streams through the gate)."""
    from hdflash_jax.config import PRESETS
    from hdflash_jax.drafter.dflash2 import DFlash2Drafter
    from hdflash_jax.drafter.model import init_drafter
    from hdflash_jax.families import family

    fam = family("dflash2")
    cfg = fam.example_config(PRESETS["tiny"])
    return fam.save(w.root / "hd2", init_drafter(cfg, 0, DFlash2Drafter), cfg)


def conv(w: World, *extra) -> list[str]:
    return ["--src", str(w.src), "--dst", str(w.dst), *map(str, extra)]


def _dst_link(w: World) -> list[str]:
    w.dst.symlink_to(w.src, target_is_directory=True)
    return conv(w, "--overwrite")


def _dst_contains_src(w: World) -> list[str]:
    return ["--src", str(w.src), "--dst", str(w.root), "--overwrite"]


def _dst_exists(w: World) -> list[str]:
    w.dst.mkdir()
    (w.dst / "keep.txt").write_text("x")
    return conv(w)


def _fake_checkpoint(p: Path) -> None:
    """A folder shaped like a converted checkpoint (config.json + params/): the converter's own kind of output."""
    (p / "params").mkdir(parents=True)
    (p / "config.json").write_text(json.dumps(tiny_cfg().to_dict()))


def _dst_ancestor_of_cwd(w: World) -> list[str]:
    deep = w.root / "here" / "deep"
    deep.mkdir(parents=True)
    w.chdir = deep
    return ["--src", str(w.src), "--dst", str(w.root / "here"), "--overwrite"]


def _parent_is_file(w: World) -> list[str]:
    (w.root / "afile").write_text("x")
    w.dst = w.root / "afile" / "out"
    return conv(w)


def _overlap(h):
    """Two same-sized tensors pointing at the same bytes (the second silently reads the first's data)."""
    h["layers.1.attn_norm.weight"]["data_offsets"] = list(h["layers.0.attn_norm.weight"]["data_offsets"])


def hf_disk_name(official: str) -> str:
    """An official name as transformers' save_pretrained writes it (the inverse of keymap._HF_DISK_RULES)."""
    if official == "head.weight":
        return official
    if official.startswith("embed."):
        return "model.embed_tokens." + official[len("embed."):]
    if official.startswith("hc_head_"):
        return "model.hc_head.hc_" + official[len("hc_head_"):]
    name = official.replace(".attn.kv_norm.", ".attn.norm.")
    name = name[: -len(".scale")] + ".weight_scale_inv" if name.endswith(".scale") else name
    return "model." + name


def _hf_disk_missing(w: World) -> list[str]:
    t = {hf_disk_name(k): v for k, v in w.base.tensors.items() if k != WKV}
    write_safetensors(w.file, t)
    return conv(w)


def _corrupt_params(folder: Path) -> None:
    """Overwrite every data file of an orbax params folder with a few garbage bytes (a truncated copy)."""
    for f in (folder / "params").rglob("d/*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage\x00")


def _corrupt_copy(kind: str):
    def make(w: World) -> list[str]:
        p = w.copy(w.base.nan_ckpt if kind in ("params", "eval", "train") else w.base.nan_drafter, "ckpt")
        _corrupt_params(p)
        w.file = p / "params"
        if kind == "eval":
            return _eval(w, "--target", str(p), "--method", "ar")
        if kind == "train":
            return _train_override(f"target.checkpoint={p}")(w)
        return [str(p)]
    return make


def _garbage_metadata(w: World) -> list[str]:
    p = w.copy(w.base.nan_ckpt, "ckpt")
    (p / "params" / "state" / "_METADATA").write_text("{garbage")
    w.file = p / "params"
    return [str(p)]


def _users_folder(w: World) -> Path:
    mine = w.root / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own notes")
    return mine


def _eval_drafter_out(w: World) -> list[str]:
    d = w.copy(w.base.nan_drafter, "drafter")
    return _eval_out(d, "--drafter", f"hd={d}", "--method", "hd")


def _train_data(text: str):
    def make(w: World) -> list[str]:
        data = w.root / "empty.jsonl"
        data.write_text(text)
        w.file = data
        return _train_override(f"data.train={data}")(w)
    return make


def _fake_results(p: Path) -> Path:
    p.mkdir(parents=True)
    (p / "results.json").write_text("{}")
    return p


def _garbage_suite(w: World, line: str = "{not json") -> Path:
    from hdflash_jax.suites import DATA_DIR, FILES

    root = w.root / "suites"
    f = root / FILES["gsm8k"]
    f.parent.mkdir(parents=True)
    first = (DATA_DIR / FILES["gsm8k"]).read_text(encoding="utf-8").splitlines()[0]
    f.write_text(first + "\n" + line + "\n" if line.startswith("{not") else line + "\n")
    return root


def _nan(key, value):
    def edit(t):
        t[key] = t[key].copy()
        t[key].reshape(-1)[0] = value
    return edit


def _nan_scale(t):
    s = t[f"{FP8}.scale"].copy()
    s.view(np.uint8).reshape(-1)[0] = 0xFF  # e8m0 NaN
    t[f"{FP8}.scale"] = s


def _two_shards_same_key(w: World) -> list[str]:
    t = dict(w.base.tensors)
    write_safetensors(w.src / "model-00002-of-00002.safetensors", {WKV: t[WKV]})
    return conv(w)


def _index_missing_shard(w: World) -> list[str]:
    write_index(w.src, {k: "model.safetensors" for k in w.base.tensors} | {WKV: "model-00002-of-00002.safetensors"})
    return conv(w)


def _index_missing_key(w: World) -> list[str]:
    write_index(w.src, {k: "model.safetensors" for k in w.base.tensors} | {"layers.9.ghost.weight": "model.safetensors"})
    return conv(w)


def _header(edit):
    def make(w: World) -> list[str]:
        raw = w.file.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        h = json.loads(raw[8: 8 + n])
        edit(h)
        new = json.dumps(h).encode()
        new += b" " * (-len(new) % 8)
        w.file.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
        return conv(w)
    return make


def _bytes(fn):
    def make(w: World) -> list[str]:
        w.file.write_bytes(fn(w.file.read_bytes()))
        return conv(w)
    return make


def _torch_file(obj_or_bytes):
    def make(w: World) -> list[str]:
        import torch

        f = w.src / "weights.pt"
        if isinstance(obj_or_bytes, bytes):
            f.write_bytes(obj_or_bytes)
        else:
            torch.save(obj_or_bytes(torch), f)
        w.file = f
        return ["--src", str(f), "--dst", str(w.dst)]
    return make


def _edit_cfg(edit):
    def make(w: World) -> list[str]:
        w.config_dict(edit)
        return conv(w)
    return make


def _eval(w: World, *extra) -> list[str]:
    return ["--suite", "gsm8k", "--limit", "1", "--tokenizer", "byte", "--quiet", "--out", str(w.dst), *extra]


def _eval_out(out: Path, *extra) -> list[str]:
    """eval.run writing to `out` with --overwrite (the output rule must refuse whatever `out` is)."""
    return ["--suite", "gsm8k", "--limit", "1", "--tokenizer", "byte", "--quiet", "--out", str(out), "--overwrite",
            *extra]


def _eval_target(text: str):
    def make(w: World) -> list[str]:
        p = w.target_ckpt(text)
        w.config = p / "config.json"
        return _eval(w, "--target", str(p))
    return make


def _eval_drafter_list(w: World) -> list[str]:
    p = w.root / "drafter"
    (p / "params").mkdir(parents=True)
    (p / "drafter_config.json").write_text("[1, 2]")
    w.config = p / "drafter_config.json"
    return _eval(w, "--drafter", f"hyperdflash={p}")


def _train_config(text: str | bytes, out: bool = True):
    def make(w: World) -> list[str]:
        f = w.root / "train.yaml"
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
        w.config = f
        return ["--config", str(f)] + (["--out", str(w.dst)] if out else [])
    return make


def _train_override(item: str):
    return lambda w: ["--config", str(REPO / "train" / "configs" / "tiny_hyperdflash.yaml"), "--override", item,
                      "--out", str(w.dst)]


TINY_YAML = str(REPO / "train" / "configs" / "tiny_hyperdflash.yaml")
OFFLINE = ("data.eval=null", "eval.every=0", "eval.at_start=false", "features.mode=offline", "data.max_len=16",
           "data.num_anchors=2", "train.global_batch=2", "train.steps=1")


def _fake_capture(folder: Path, overrides: list[str]) -> None:
    """What `--capture-features` writes for the config `overrides` give, without running the target: the layout's
    arrays filled with random values, the source recorded from that config."""
    from hdflash_jax.tokenizer import load_tokenizer
    from hdflash_jax.train_config import load_config
    from hdflash_jax.training.features import FeatureWriter, Layout, feature_source
    from train.trainer import drafter_for, target_config

    cfg = load_config(TINY_YAML, overrides)
    tcfg = target_config(cfg.target)
    fam, dcfg, lcfg = drafter_for(cfg, tcfg, load_tokenizer(cfg.data.tokenizer))
    layout = Layout.of(fam, dcfg, lcfg, tcfg)
    n, length, rng = 4, cfg.data.max_len, np.random.default_rng(0)
    folder.mkdir()
    writer = FeatureWriter(folder, layout, feature_source(cfg, fam, dcfg), n, length, 2)
    writer.add({k: rng.standard_normal((n, length) + shape).astype(dt) for k, (shape, dt) in layout.arrays.items()})
    writer.finish()


def _offline(edit=None, *extra: str, captured_with: tuple[str, ...] = (), captured: bool = True,
             capture_flag: bool = False):
    """train.drafter on offline features in {root}/features (`_fake_capture` of this run's config with
    `captured_with` applied), spoilt by `edit(w, folder)`; the run adds `extra` overrides ({root} filled in).
    `capture_flag`: run `--capture-features` with that config instead."""
    def make(w: World) -> list[str]:
        data = w.root / "train.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "abcdefgh"}) + "\n" for i in range(4)))
        feats = w.root / "features"
        over = [f"data.train={data}", f"features.dir={feats}", *OFFLINE]
        if captured:
            _fake_capture(feats, over + list(captured_with))
        if edit is not None:
            edit(w, feats)
        runs = over + [o.format(root=w.root) for o in extra]
        argv = ["--config", TINY_YAML] + [a for o in runs for a in ("--override", o)]
        return argv + (["--capture-features"] if capture_flag else ["--out", str(w.dst)])
    return make


def _truncate(name: str):
    def edit(w: World, folder: Path) -> None:
        w.file = folder / name
        w.file.write_bytes(w.file.read_bytes()[:-100])
    return edit


def _regen(target_of: Callable[[World], Path]):
    def make(w: World) -> list[str]:
        data = w.root / "rows.jsonl"
        data.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
        w.dst = w.root / "regen.jsonl"
        return ["--target", str(target_of(w)), "--data", str(data), "--out", str(w.dst), "--no-progress"]
    return make


def _bad_target(w: World) -> Path:
    p = w.target_ckpt(json.dumps({**tiny_cfg().to_dict(), "dim": "48"}))
    w.config = p / "config.json"
    return p


def _loader_config(text: str, kind: str):
    def make(w: World) -> list[str]:
        src = w.base.nan_ckpt if kind == "params" else w.base.nan_drafter
        p = w.copy(src, "ckpt")
        w.config = p / ("config.json" if kind == "params" else "drafter_config.json")
        w.config.write_text(text)
        return [str(p)]
    return make


def _drafter_config_edit(edit):
    def make(w: World) -> list[str]:
        p = w.copy(w.base.nan_drafter, "ckpt")
        w.config = p / "drafter_config.json"
        d = json.loads(w.config.read_text())
        edit(d)
        w.config.write_text(json.dumps(d))
        return [str(p)]
    return make


def _loader_nan(kind: str):
    def make(w: World) -> list[str]:
        p = w.copy(w.base.nan_ckpt if kind == "params" else w.base.nan_drafter, "ckpt")
        w.file = p / "params"
        return [str(p)]
    return make


NOT_FINITE = "non-finite values (NaN or Inf)"
CFG_STR = json.dumps({**tiny_cfg().to_dict(), "dim": "48"})

def _regen_over_a_users_file(w: World) -> list[str]:
    argv = _regen(lambda w: w.copy(w.base.nan_ckpt, "ckpt"))(w)
    w.dst.write_text("my notes\n")  # --out: a file of the user's, not a JSONL train.regenerate wrote
    return argv


CASES = [
    # ---- the converter: paths ----
    # (refused before anything is read: exit 2, the output rule of hdflash_jax.fileio.check_output)
    Case("dst_is_src", "convert", lambda w: ["--src", str(w.src), "--dst", str(w.src), "--overwrite"],
         ("--dst {src}: is the source --src {src}", "choose a destination outside it"), rc=2, real_process=True),
    Case("dst_inside_src", "convert", lambda w: ["--src", str(w.src), "--dst", str(w.src / "out"), "--overwrite"],
         ("--dst {src}/out: lies inside the source --src {src}",), rc=2),
    Case("dst_contains_src", "convert", _dst_contains_src, ("--dst {root}: contains the source --src {src}",), rc=2),
    Case("dst_symlink_to_src", "convert", _dst_link, ("--dst {dst}: is the source --src {src}",), rc=2),
    Case("dst_contains_config", "convert",
         lambda w: ["--src", str(w.src / "model.safetensors"), "--dst", str(w.src), "--config", str(w.config),
                    "--overwrite"], ("--dst {src}: contains the source --src {src}/model.safetensors",), rc=2),
    Case("dst_users_folder", "convert", _dst_exists,
         ("--dst {dst}: exists and is not a converted checkpoint", "even with --overwrite"), rc=2),
    Case("dst_users_folder_overwrite", "convert", lambda w: _dst_exists(w) + ["--overwrite"],
         ("--dst {dst}: exists and is not a converted checkpoint", "even with --overwrite"), rc=2),
    Case("dst_users_file_overwrite", "convert", lambda w: (w.dst.write_text("an old file"), conv(w, "--overwrite"))[1],
         ("--dst {dst}: exists and is a file, not a converted checkpoint",), rc=2),
    Case("dst_checkpoint_exists", "convert", lambda w: (_fake_checkpoint(w.dst), conv(w))[1],
         ("--dst {dst}: destination exists (pass --overwrite to replace it)",), rc=2),
    Case("dst_parent_is_file", "convert", _parent_is_file, ("--dst {dst}: cannot be created: {root}/afile is a file",),
         rc=2),
    Case("dst_empty_overwrite", "convert", lambda w: ["--src", str(w.src), "--dst", "", "--overwrite"],
         ("--dst '': an empty path",), rc=2, real_process=True),
    Case("dst_ancestor_of_cwd", "convert", _dst_ancestor_of_cwd,
         ("--dst {root}/here: contains the current folder {root}/here/deep",), rc=2),
    Case("dst_is_checkout", "convert", lambda w: ["--src", str(w.src), "--dst", str(REPO), "--overwrite"],
         (f"--dst {REPO}: is the project checkout",), rc=2),
    Case("src_missing", "convert", lambda w: ["--src", str(w.root / "nowhere"), "--dst", str(w.dst)],
         ("{root}/nowhere: no such file or folder",)),
    # ---- the converter: values ----
    Case("nan_tensor", "convert", lambda w: (w.tensors(_nan(WKV, np.nan)), conv(w))[1],
         ("{file}: tensor 'layers.1.attn.wkv.weight' holds 1 " + NOT_FINITE, "--allow-nonfinite")),
    Case("inf_tensor", "convert", lambda w: (w.tensors(_nan("embed.weight", np.inf)), conv(w))[1],
         ("{file}: tensor 'embed.weight' holds 1 " + NOT_FINITE,)),
    Case("nan_fp8_scale", "convert", lambda w: (w.tensors(_nan_scale), conv(w))[1],
         (f"{{file}}: tensor '{FP8}.weight' holds", f"after dequantization with its scale '{FP8}.scale'")),
    # ---- the converter: config.json ----
    Case("hf_config_str", "convert", lambda w: (w.hf_config(hidden_size="48"), conv(w))[1],
         ("{config}: field 'hidden_size': expected an integer, got '48' (str)",), real_process=True),
    Case("official_config_str", "convert", _edit_cfg(lambda d: d.update(dim="48")),
         ("{config}: field 'dim': expected an integer, got '48' (str)",)),
    Case("config_bool_for_number", "convert", _edit_cfg(lambda d: d.update(route_scale=True)),
         ("{config}: field 'route_scale': expected a finite number, got True (bool)",)),
    Case("config_ratios_str", "convert", _edit_cfg(lambda d: d.update(compress_ratios="040")),
         ("{config}: field 'compress_ratios': expected a list of integers, got '040' (str)",)),
    Case("config_list", "convert", lambda w: (w.config.write_text("[1, 2]"), conv(w))[1],
         ("{config}: expected a JSON object of config fields, got a list",)),
    Case("config_not_json", "convert", lambda w: (w.config.write_text("{dim: 4"), conv(w))[1],
         ("{config}: not valid JSON",)),
    Case("config_missing", "convert", lambda w: (w.config.unlink(), conv(w))[1],
         ("{src}: missing config", "pass --config FILE")),
    # ---- the converter: tensors (names, shapes, dtypes) ----
    Case("missing_tensor", "convert", lambda w: (w.tensors(lambda t: t.pop(WKV)), conv(w))[1],
         ("{file}: missing tensor 'layers.1.attn.wkv.weight'",)),
    Case("unexpected_tensor", "convert",
         lambda w: (w.tensors(lambda t: t.update({"layers.1.attn.bogus.weight": np.zeros(3, np.float32)})),
                    conv(w))[1], ("{file}: unexpected tensor 'layers.1.attn.bogus.weight'", "--allow-unused")),
    Case("wrong_shape", "convert",
         lambda w: (w.tensors(lambda t: t.update({"layers.1.attn.wq_b.weight": np.zeros((32, 256), np.float32)})),
                    conv(w))[1], ("{file}: tensor 'layers.1.attn.wq_b.weight' has shape [32, 256]", "[256, 32]")),
    Case("wrong_dtype", "convert", lambda w: (w.tensors(lambda t: t.update({"norm.weight": np.ones(64, np.int32)})),
                                              conv(w))[1], ("{file}: tensor 'norm.weight' has dtype I32",)),
    Case("fp8_without_scale", "convert", lambda w: (w.tensors(lambda t: t.pop(f"{FP8}.scale")), conv(w))[1],
         (f"{{file}}: FP8 tensor '{FP8}.weight' has no scale tensor",)),
    Case("duplicate_key_across_shards", "convert", _two_shards_same_key,
         ("{file}: tensor 'layers.1.attn.wkv.weight' is also in {src}/model-00002-of-00002.safetensors",)),
    Case("index_missing_shard", "convert", _index_missing_shard,
         ("{src}/model.safetensors.index.json: shard model-00002-of-00002.safetensors is missing",)),
    Case("index_missing_key", "convert", _index_missing_key,
         ("{src}/model.safetensors.index.json: lists tensor 'layers.9.ghost.weight' in model.safetensors, "
          "which does not contain it",)),
    Case("overlapping_tensors", "convert", _header(_overlap),
         ("{file}: corrupt header: tensors 'layers.0.attn_norm.weight'", "and 'layers.1.attn_norm.weight'",
          "overlap")),
    Case("hf_disk_missing_tensor", "convert", _hf_disk_missing,
         ("{file}: missing tensor 'model.layers.1.attn.wkv.weight' (official name 'layers.1.attn.wkv.weight')",)),
    Case("config_missing_shape_field", "convert", _edit_cfg(lambda d: d.pop("n_heads")),
         ("has shape", "note: {config} does not set n_heads, so the defaults n_heads=64 were used")),
    # ---- the converter: corrupt safetensors ----
    Case("tiny_file", "convert", _bytes(lambda b: b"\x10\x00"), ("{file}: truncated safetensors file",)),
    Case("truncated_header", "convert", _bytes(lambda b: b[:64]), ("{file}: truncated or corrupt safetensors",)),
    Case("truncated_data", "convert", _bytes(lambda b: b[:-1000]), ("{file}: truncated file: tensor",)),
    Case("header_not_json", "convert", _bytes(lambda b: b[:8] + b"{not json!!!" + b[20:]),
         ("{file}: corrupt safetensors header (not valid JSON",)),
    Case("unknown_st_dtype", "convert", _header(lambda h: h[WKV].update(dtype="Q7")),
         ("{file}: tensor 'layers.1.attn.wkv.weight' has unknown dtype 'Q7'",)),
    Case("offsets_past_eof", "convert",
         _header(lambda h: h[WKV].update(data_offsets=[o + 10**9 for o in h[WKV]["data_offsets"]])),
         ("{file}: truncated file: tensor 'layers.1.attn.wkv.weight'", "past the end of the file")),
    # ---- the converter: torch files ----
    Case("garbage_pt", "convert", _torch_file(b"not a zip or a pickle"),
         ("{file}: not a PyTorch state dict",), absent=("weights_only", "arbitrary code"), real_process=True),
    Case("pt_with_objects", "convert", _torch_file(lambda torch: {"a": __import__("fractions").Fraction(1, 2)}),
         ("{file}: not a PyTorch state dict", "fractions.Fraction"), absent=("weights_only", "safe_globals")),
    Case("pt_list", "convert", _torch_file(lambda torch: [torch.zeros(2)]),
         ("{file}: not a PyTorch state dict (it holds a list",)),
    Case("pt_unknown_dtype", "convert", _torch_file(lambda torch: {"embed.weight": torch.zeros(2, dtype=torch.complex64)}),
         ("{file}: tensor 'embed.weight' has unknown dtype",)),
    # ---- eval.run ----
    Case("eval_unknown_suite", "eval", lambda w: _eval(w)[:0] + ["--suite", "gsm9k", "--out", str(w.dst)],
         ("--suite: unknown suite 'gsm9k'",), rc=2),
    Case("eval_unknown_method", "eval", lambda w: _eval(w, "--method", "ar,medusa"),
         ("unknown method 'medusa'",), rc=2),
    Case("eval_schedule_without_head", "eval", lambda w: _eval(w, "--method", "ar,hyperdflash",
                                                               "--confidence-schedule", "auto"),
         ("--confidence-schedule: method hyperdflash has no confidence head",), rc=2),
    Case("eval_target_config_str", "eval", _eval_target(CFG_STR),
         ("--target {root}/target: {config}: field 'dim': expected an integer, got '48' (str)",), rc=2),
    Case("eval_target_config_list", "eval", _eval_target("[1, 2]"),
         ("{config}: expected a JSON object of config fields, got a list",), rc=2, real_process=True),
    Case("eval_drafter_config_list", "eval", _eval_drafter_list,
         ("--drafter hyperdflash: {config}: expected a JSON object of DrafterConfig fields, got a list",), rc=2),
    Case("eval_target_nan", "eval", lambda w: _eval(w, "--target", str(w.copy(w.base.nan_ckpt, "ckpt")),
                                                    "--method", "ar"),
         ("{root}/ckpt/params: parameter 'layers.1.attn.wkv.weight' holds 1 " + NOT_FINITE,), rc=2),
    Case("eval_drafter_nan", "eval",
         lambda w: _eval(w, "--method", "hyperdflash", "--drafter",
                         f"hyperdflash={w.copy(w.base.nan_drafter, 'drafter')}"),
         ("{root}/drafter/params: parameter '{drafter_key}' holds 1 " + NOT_FINITE,), rc=2),
    Case("eval_out_is_checkout", "eval", lambda w: _eval_out(REPO),
         (f"--out {REPO}: is the project checkout {REPO}", "choose a new folder"), rc=2),
    Case("eval_out_contains_cwd", "eval", lambda w: (setattr(w, "chdir", _users_folder(w)), _eval_out(w.root))[1],
         ("--out {root}: contains the current folder {root}/mine",), rc=2),
    Case("eval_out_is_builtin_model", "eval",
         lambda w: ["--target", "small", "--suite", "gsm8k", "--limit", "1", "--quiet", "--out",
                    str(REPO / "models" / "small"), "--overwrite"],
         (f"--out {REPO}/models/small: is the input --target {REPO}/models/small",), rc=2),
    Case("eval_out_is_target", "eval", lambda w: _eval_out(w.root / "ckpt", "--target",
                                                            str(w.copy(w.base.nan_ckpt, "ckpt"))),
         ("--out {root}/ckpt: is the input --target {root}/ckpt",), rc=2),
    Case("eval_out_is_drafter", "eval", _eval_drafter_out,
         ("--out {root}/drafter: is the drafter hd {root}/drafter",), rc=2),
    Case("eval_out_users_folder", "eval", lambda w: _eval_out(_users_folder(w)),
         ("--out {root}/mine: exists and is not an eval.run results folder", "even with --overwrite"), rc=2),
    Case("eval_out_is_file", "eval", lambda w: (w.dst.write_text("x"), _eval(w, "--overwrite"))[1],
         ("--out {dst}: exists and is a file",), rc=2),
    Case("eval_target_corrupt", "eval", _corrupt_copy("eval"), ("{file}: parameter '", "cannot be read"), rc=2,
         real_process=True),
    # ---- train.drafter ----
    Case("train_config_list", "train", _train_config("- a\n- b\n"),
         ("--config {config}: expected a mapping at the top level",), rc=2),
    Case("train_config_missing", "train", lambda w: ["--config", str(w.root / "nope.yaml")],
         ("--config {root}/nope.yaml: file not found",), rc=2),
    Case("train_target_nan", "train",
         lambda w: _train_override(f"target.checkpoint={w.copy(w.base.nan_ckpt, 'ckpt')}")(w),
         ("{root}/ckpt/params: parameter 'layers.1.attn.wkv.weight' holds 1 " + NOT_FINITE,), rc=2),
    # train-stack's typed config (their cases and messages, /tmp/notes/train-stack-badinputs.md)
    *[Case(f"train_{cid}", "train", make, (msg,), rc=2) for cid, make, msg in [
        ("lr_fast_override", _train_override("optim.lr=fast"), "optim.lr: expected a number, got 'fast'"),
        ("lr_fast", _train_config("optim: {lr: fast}\n"), "optim.lr: expected a number, got 'fast'"),
        ("steps_three_override", _train_override("train.steps=three"),
         "train.steps: expected an integer, got 'three'"),
        ("steps_three", _train_config('train: {steps: "three"}\n'), "train.steps: expected an integer, got 'three'"),
        ("steps_float", _train_override("train.steps=2.5"), "train.steps: expected an integer, got 2.5"),
        ("steps_zero", _train_config("train: {steps: 0}\n"), "train.steps: must be >= 1, got 0"),
        ("unknown_key", _train_override("optim.lrr=1"), "optim.lrr: unknown key (known: lr, warmup_frac,"),
        ("unknown_section", _train_config("optimizer: {lr: 1.0e-3}\n"), "optimizer: unknown key (known: out_dir,"),
        ("section_scalar", _train_config("optim: 3\n"), "optim: expected a mapping, got 3"),
        ("broken_yaml", _train_config("optim: {lr: 1.0e-3\n"), "--config {config}: not valid YAML/JSON at line 2"),
        ("binary", _train_config(b"\xff\xfe\x00"), "--config {config}: not a text file"),
        ("drafter_field", _train_config("drafter: {kind: block, n_layerz: 2}\n"),
         "drafter.n_layerz: unknown key (known: kind, preset, init_from_target, n_layers,"),
        ("drafter_field_type", _train_config("drafter: {kind: dspark, markov_rank: big}\n"),
         "drafter.markov_rank: expected an integer, got 'big'"),
        ("target_override_str", _train_override("target.overrides.dim=big"),
         "target.overrides.dim: expected an integer, got 'big'"),
        ("bool_field", _train_config("export_drafter: yes_please\n"),
         "export_drafter: expected true or false, got 'yes_please'"),
        ("override_no_value", _train_override("lr"), "--override 'lr': expected key=value with a dotted key"),
        ("lr_negative", _train_override("optim.lr=-1"), "optim.lr: must be > 0, got -1.0"),
    ]],
    *[Case(f"pretrain_{cid}", "pretrain", make, (msg,), rc=2) for cid, make, msg in [
        ("lr_fast", lambda w: ["--preset", "small", "--override", "optim.lr=fast"],
         "optim.lr: expected a number, got 'fast'"),
        ("steps_three", lambda w: ["--preset", "small", "--override", "train.steps=three"],
         "train.steps: expected an integer, got 'three'"),
        ("model_field", lambda w: ["--override", "model.nope=3"], "model.nope: unknown key (not a TargetConfig field)"),
        ("model_dim_str", _train_config("model: {dim: big}\n", out=False), "model.dim: expected an integer, got 'big'"),
        ("unknown_preset", _train_config("preset: huge\n", out=False), "preset: unknown preset 'huge'"),
        ("config_list", _train_config("- 1\n- 2\n", out=False),
         "--config {config}: expected a mapping at the top level, got a list"),
    ]],
    Case("train_out_is_file", "train", lambda w: (w.dst.write_text("x"), _train_override("seed=0")(w))[1],
         ("out_dir {dst}: exists and is a file",), rc=2),
    Case("train_out_contains_target", "train",
         lambda w: _train_override(f"target.checkpoint={w.copy(w.base.nan_ckpt, 'ckpt')}")(w)[:-1] + [str(w.root)],
         ("out_dir {root}: contains the target target.checkpoint {root}/ckpt",), rc=2),
    Case("train_out_users_folder", "train", lambda w: _train_override("seed=0")(w)[:-1] + [str(_users_folder(w))],
         ("out_dir {root}/mine: exists and is not a train.drafter run folder",), rc=2),
    Case("train_empty_responses", "train", _train_data("".join(json.dumps({"prompt": f"q{i}", "response": ""}) + "\n"
                                                             for i in range(6))),
         ("{file}: no supervised token in the 6 records",), rc=2),
    Case("train_target_corrupt", "train", _corrupt_copy("train"), ("{file}: parameter '", "cannot be read"), rc=2,
         real_process=True),
    # ---- train.drafter on offline features (features.mode: offline), and --capture-features ----
    Case("train_features_no_dir", "train", _train_override("features.mode=offline"),
         ("features.dir: required with features.mode offline",), rc=2),
    Case("train_features_not_found", "train", _offline(None, captured=False),
         ("features.dir {root}/features: not found",), rc=2),
    Case("train_features_with_eval", "train", _offline(None, "data.eval={root}/train.jsonl", "eval.at_start=true"),
         ("eval.at_start: needs the target's layers",), rc=2),
    Case("train_features_other_seed", "train", _offline(None, "target.seed=1"),
         ("features.dir {root}/features: captured with target.seed 0, this run has 1",), rc=2, real_process=True),
    Case("train_features_other_max_len", "train", _offline(None, "data.max_len=24"),
         ("features.dir {root}/features: captured with data.max_len 16, this run has 24",), rc=2),
    Case("train_features_other_conditioning", "train", _offline(None, "drafter.conditioning=layers"),
         ("captured with drafter.conditioning 'final_streams', this run has 'layers'",), rc=2),
    Case("train_features_corpus_changed", "train",
         _offline(lambda w, f: (w.root / "train.jsonl").write_text('{"prompt": "q", "response": "other"}\n')),
         ("features.dir {root}/features: captured with data.train sha256 '",), rc=2),
    Case("train_features_no_teacher", "train", _offline(None, captured_with=("drafter.loss.kl_alpha=0",)),
         ("features.dir {root}/features: holds no 'hidden' array", "drafter.loss.kl_alpha 0"), rc=2),
    Case("train_features_truncated", "train", _offline(_truncate("features-00001.npy")),
         ("{file}: ", "bytes, expected", "(a truncated or corrupt shard)"), rc=2),
    Case("train_features_shard_missing", "train", _offline(lambda w, f: (f / "hidden-00000.npy").unlink()),
         ("features.dir {root}/features: shard file hidden-00000.npy is missing",), rc=2),
    Case("train_features_shard_not_npy", "train",
         _offline(lambda w, f: (f / "tokens-00000.npy").write_bytes(b"not an array")),
         ("{root}/features/tokens-00000.npy: not a .npy array file",), rc=2),
    Case("train_features_index_corrupt", "train", _offline(lambda w, f: (f / "index.json").write_text("{")),
         ("{root}/features/index.json: not a valid features index (not valid JSON",), rc=2),
    Case("train_features_index_no_shards", "train",
         _offline(lambda w, f: (f / "index.json").write_text(json.dumps(
             {k: v for k, v in json.loads((f / "index.json").read_text()).items() if k != "shards"}))),
         ("{root}/features/index.json: not a valid features index (missing or malformed key 'shards')",), rc=2),
    Case("capture_exists", "train", _offline(None, capture_flag=True),
         ("features.dir {root}/features: destination exists (pass --overwrite to replace it)",), rc=2),
    Case("capture_users_folder", "train",
         lambda w: _offline(None, f"features.dir={_users_folder(w)}", captured=False, capture_flag=True)(w),
         ("features.dir {root}/mine: exists and is not an offline-features folder",), rc=2),
    Case("capture_over_the_data", "train",
         _offline(None, "features.dir={root}/train.jsonl", captured=False, capture_flag=True),
         ("features.dir {root}/train.jsonl: is the data data.train",), rc=2),
    Case("capture_no_dir", "train", lambda w: ["--config", TINY_YAML, "--capture-features"],
         ("features.dir: required with --capture-features",), rc=2),
    # ---- train.regenerate ----
    Case("regen_target_not_ckpt", "regenerate", _regen(lambda w: w.src),
         ("--target {src}: a folder that is not a params checkpoint",), rc=2),
    Case("regen_target_config_str", "regenerate", _regen(_bad_target),
         ("{config}: field 'dim': expected an integer, got '48' (str)",), rc=2),
    Case("regen_target_nan", "regenerate", _regen(lambda w: w.copy(w.base.nan_ckpt, "ckpt")),
         ("{root}/ckpt/params: parameter 'layers.1.attn.wkv.weight' holds 1 " + NOT_FINITE,), rc=2),
    Case("regen_out_is_data", "regenerate",
         lambda w: (lambda a: a[:a.index("--out") + 1] + [a[a.index("--data") + 1]] + a[a.index("--out") + 2:])(
             _regen(lambda w: w.copy(w.base.nan_ckpt, "ckpt"))(w)),
         ("--out {root}/rows.jsonl: is the input --data {root}/rows.jsonl",), rc=2),
    Case("regen_out_foreign_file", "regenerate",
         _regen_over_a_users_file,
         ("--out {root}/regen.jsonl: exists and is not a JSONL written by train.regenerate",), rc=2),
    # ---- the drafter exporter, the small pipeline, merge_runs, the suites' files ----
    Case("export_dst_is_src", "export",
         lambda w: ["--to", "zlab", "--src", str(w.copy(w.base.nan_drafter, "d")), "--dst", str(w.root / "d"),
                    "--overwrite"], ("--dst {root}/d: is the source --src {root}/d",), rc=2, real_process=True),
    Case("export_dst_contains_src", "export",
         lambda w: ["--to", "zlab", "--src", str(w.copy(w.base.nan_drafter, "d")), "--dst", str(w.root),
                    "--overwrite"], ("--dst {root}: contains the source --src {root}/d",), rc=2),
    Case("export_dst_users_folder", "export",
         lambda w: ["--to", "zlab", "--src", str(w.copy(w.base.nan_drafter, "d")), "--dst", str(_users_folder(w)),
                    "--overwrite"], ("--dst {root}/mine: exists and is not a z-lab DFlash folder",), rc=2),
    Case("export_hyperdflash2_to_speculators", "export",
         lambda w: ["--to", "speculators", "--src", str(_hyperdflash2(w)), "--dst", str(w.root / "spec")],
         ("speculators' DFlashDraftModel conditions on tapped layers through a linear fc; this drafter is "
          "final_streams/gated",), rc=2),
    Case("pipeline_ship_users_folder", "pipeline",
         lambda w: (setattr(w, "chdir", w.root), ["--size", "ci", "--stages", "ship", "--out", str(w.root / "run"),
                                                  "--ship", str(_users_folder(w))])[1],
         ("--ship {root}/mine: exists and is not a shipped small model",), rc=2),
    Case("pipeline_ship_checkout", "pipeline",
         lambda w: (setattr(w, "chdir", w.root), ["--size", "ci", "--stages", "ship", "--out", str(w.root / "run"),
                                                  "--ship", str(REPO)])[1],
         ("--ship .: is the project checkout",), rc=2),
    Case("merge_out_is_a_run", "merge",
         lambda w: [str(_fake_results(w.root / "r1")), str(w.root / "r1"), str(_fake_results(w.root / "r2"))],
         ("--out {root}/r1: is the run {root}/r1",), rc=2),
    Case("entropy_out_users_file", "entropy",
         lambda w: ["--target", "tiny-random", "--suite", "gsm8k", "--limit", "1", "--out",
                    str(_users_folder(w) / "notes.txt")],
         ("--out {root}/mine/notes.txt: exists and is not a JSON report",), rc=2),
    Case("seed_compare_json_over_a_run", "seed_compare",
         lambda w: [str(_fake_results(w.root / "r1")), "--variants", "hd", "--json",
                    str(w.root / "r1" / "results.json")],
         ("--json {root}/r1/results.json: lies inside the input run {root}/r1",), rc=2),
    Case("suite_file_garbage", "load_suite", lambda w: [str(_garbage_suite(w)), "gsm8k"],
         ("{root}/suites/gsm8k/test.jsonl: line 2 is not valid JSON",), rc="ValueError"),
    Case("suite_file_wrong_records", "load_suite", lambda w: [str(_garbage_suite(w, '{"x": 1}')), "gsm8k"],
         ("{root}/suites/gsm8k/test.jsonl: not a gsm8k file (KeyError",), rc="ValueError"),
    # ---- load_params / load_drafter ----
    Case("load_params_corrupt", "load_params", _corrupt_copy("params"), ("{file}: parameter '", "cannot be read"),
         rc="ValueError"),
    Case("load_params_garbage_metadata", "load_params", _garbage_metadata,
         ("{file}: cannot be read (a corrupt or truncated checkpoint",), rc="ValueError"),
    Case("load_drafter_corrupt", "load_drafter", _corrupt_copy("drafter"), ("{file}: parameter '", "cannot be read"),
         rc="ValueError"),
    Case("load_params_nan", "load_params", _loader_nan("params"),
         ("{file}: parameter 'layers.1.attn.wkv.weight' holds 1 " + NOT_FINITE,), rc="ValueError"),
    Case("load_params_config_str", "load_params", _loader_config(CFG_STR, "params"),
         ("{config}: field 'dim': expected an integer, got '48' (str)",), rc="ValueError"),
    Case("load_params_config_list", "load_params", _loader_config("[1, 2]", "params"),
         ("{config}: expected a JSON object of config fields, got a list",), rc="ValueError"),
    Case("load_drafter_nan", "load_drafter", _loader_nan("drafter"),
         ("{file}: parameter '{drafter_key}' holds 1 " + NOT_FINITE,), rc="ValueError"),
    Case("load_drafter_config_str", "load_drafter", _drafter_config_edit(lambda d: d.update(n_layers="2")),
         ("{config}: field 'n_layers': expected an integer, got '2' (str)",), rc="ValueError"),
    Case("load_drafter_config_bool", "load_drafter", _drafter_config_edit(lambda d: d.update(post_norm="yes")),
         ("{config}: field 'post_norm': expected true or false, got 'yes' (str)",), rc="ValueError"),
    Case("load_drafter_config_list", "load_drafter", _loader_config("[1, 2]", "drafter"),
         ("{config}: expected a JSON object of DrafterConfig fields, got a list",), rc="ValueError"),
]

OTHER_TOOLS = {"export": "convert.drafter_export", "pipeline": "train.small_pipeline", "merge": "eval.merge_runs",
               "entropy": "eval.entropy", "seed_compare": "eval.seed_compare"}

ENTRY = {"convert": [str(REPO / "convert" / "torch_to_flax.py")], "eval": ["-m", "eval.run"],
         "export": ["-m", "convert.drafter_export"],
         "train": ["-m", "train.drafter"], "regenerate": ["-m", "train.regenerate"]}


def run_tool(tool: str, argv: list[str], capsys) -> tuple[int | str, str]:
    """In-process: (exit status or exception class name, stdout + stderr)."""
    if tool == "convert":
        rc = t2f.main(argv + ["--quiet"])
    elif tool == "eval":
        from eval import run as ev

        rc = ev.main(argv)
    elif tool == "train":
        from train import drafter as td

        rc = td.main(argv)
    elif tool == "pretrain":
        from train import pretrain_target as pt

        rc = pt.main(argv)
    elif tool == "regenerate":
        from train import regenerate as rg

        rc = rg.main(argv)
    elif tool in OTHER_TOOLS:
        import importlib

        rc = importlib.import_module(OTHER_TOOLS[tool]).main(argv)
    elif tool == "load_suite":
        from hdflash_jax.suites import load_suite

        try:
            load_suite(argv[1], data_dir=argv[0])
            rc = 0
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            rc = type(e).__name__
    else:
        from hdflash_jax.families import family

        fn = load_params if tool == "load_params" else family("block").load
        try:
            fn(argv[0])
            rc = 0
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            rc = type(e).__name__
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def check_output(case: Case, w: World, rc, out: str) -> None:
    assert rc == case.rc, out
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out
    for n in case.needles:
        n = n.format(**w.names())
        assert n in errors[0], (n, errors[0])
    for a in case.absent:
        assert a not in out, (a, out)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, base, tmp_path, capsys, monkeypatch):
    w = World(tmp_path / "world", base)
    argv = case.make(w)
    before = snapshot(w.root)
    if w.chdir is not None:
        monkeypatch.chdir(w.chdir)
    rc, out = run_tool(case.tool, argv, capsys)
    check_output(case, w, rc, out)
    assert snapshot(w.root) == before  # sources byte-identical, nothing left at DST (no DST.tmp-*, DST.old-*)


def test_dst_in_readonly_folder(base, tmp_path, capsys, readonly_dir):
    w = World(tmp_path / "world", base)
    w.dst = readonly_dir / "out"
    before = snapshot(w.root)
    rc, out = run_tool("convert", conv(w), capsys)
    check_output(Case("ro", "convert", conv, (f"--dst {w.dst}: cannot be created: the folder {readonly_dir} is "
                                                f"not writable",), rc=2), w, rc, out)
    assert snapshot(w.root) == before


REAL = [c for c in CASES if c.real_process]


@pytest.mark.parametrize("case", REAL, ids=[c.id for c in REAL])
def test_real_process_prints_one_line(case: Case, base, tmp_path):
    w = World(tmp_path / "world", base)
    argv = case.make(w) + (["--quiet"] if case.tool == "convert" else [])
    before = snapshot(w.root)
    r = subprocess.run([sys.executable, *ENTRY[case.tool], *argv], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    check_output(case, w, r.returncode, r.stdout + r.stderr)
    assert snapshot(w.root) == before


# ---- the flags that let a bad input through, and replacing a DST -----------------------------------------------

def test_allow_nonfinite_records_counts(base, tmp_path, capsys):
    w = World(tmp_path / "world", base)
    w.tensors(lambda t: (_nan(WKV, np.nan)(t), _nan("embed.weight", np.inf)(t)))
    rc, out = run_tool("convert", conv(w, "--allow-nonfinite", "--dtype", "fp32"), capsys)
    assert rc == 0, out
    report = json.loads((w.dst / "report.json").read_text())
    assert report["nonfinite_values"] == 2
    assert report["nonfinite_tensors"] == {WKV: 1, "embed.weight": 1}
    assert "2 non-finite values kept" in out
    with pytest.raises(ValueError, match=r"parameter 'embed' holds 1 non-finite"):
        load_params(w.dst)  # the first of the two, in sorted order


def test_overwrite_replaces_an_earlier_conversion_without_leftovers(base, tmp_path, capsys):
    w = World(tmp_path / "world", base)
    _fake_checkpoint(w.dst)  # an earlier output of the converter: its own kind, replaced with --overwrite
    rc, out = run_tool("convert", conv(w, "--overwrite", "--dtype", "fp32"), capsys)
    assert rc == 0, out
    assert w.dst.is_dir() and (w.dst / "report.json").is_file()
    assert sorted(p.name for p in w.root.iterdir()) == ["out", "src"]  # no out.old-<pid>, no out.tmp-<pid>
    cfg, model = load_params(w.dst)
    np.testing.assert_array_equal(np.asarray(model.layers[1].attn.wkv.weight.get_value()), base.tensors[WKV])


def test_nonfinite_counts_device_path_agrees():
    """The jitted path (used on accelerators) counts what the numpy path counts."""
    import jax.numpy as jnp

    from hdflash_jax.checkpoint import nonfinite_counts

    a = np.ones((3, 5), np.float32)
    a[1, 2], a[2, 4] = np.nan, -np.inf
    arrays = {"a": jnp.asarray(a), "b": jnp.ones(4, jnp.bfloat16), "c": jnp.arange(3),
              "d": jnp.asarray(np.array([np.inf], np.float32)).astype(jnp.bfloat16)}
    assert nonfinite_counts(arrays, on_device=True) == nonfinite_counts(arrays, on_device=False) == {"a": 2, "d": 1}
    assert nonfinite_counts({"e": np.array([1, np.nan], ml_dtypes.bfloat16)}) == {"e": 1}
