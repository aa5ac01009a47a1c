"""Stage 1 of the built-in small model: the pretraining corpus, from vendored offline text only.

    python -m train.corpus --out runs/small/corpus [--heldout-frac 0.02] [--ngram 13] [--force]
    python -m train.corpus --vendor-stdlib          # (maintainers) re-extract the stdlib text into train/data/

Sources (all under `train/data/`, licenses in `train/data/LICENSES.md`):

* gsm8k_train (chat): GSM8K train; user = question + the eval's math instruction, assistant = the worked
  solution with the calculator annotations `<<..>>` removed and `#### x` rewritten as `The answer is \\boxed{x}.`
* mbpp_nontest (chat): MBPP task_ids 1–10 (prompt), 511–600 (validation), 601–974 (train); user = the eval's MBPP
  prompt, assistant = the reference code in a ```python block
* python_stdlib (text): CPython 3.11.7 `Lib/*.py`, public top-level modules of at most 64 KB (PSF-2.0)
* pydoc_topics (text): CPython 3.11.7 `pydoc_data/topics.py`, the language-reference help topics as prose (PSF-2.0)

The chat prompts use the evaluation's own templates (`hdflash_jax.suites.MATH_INSTRUCTION`, `MBPP_TEMPLATE`), so the
model learns the format it will be prompted with, but never a held-out prompt: every training document is checked
for word n-gram overlap (default 13-grams, as in GPT-3's contamination study) with every evaluation prompt of
`hdflash_jax.suites` (GSM8K test, MATH-500, HumanEval, MBPP test 11–510, MT-Bench); documents that share any n-gram are
dropped (counted in the manifest). N-grams are taken inside the pieces of text between the templates' fixed
words (never across them, or every templated prompt would match every other), and pieces shorter than n words
are matched whole. The finished splits are checked again and must come out clean; the manifest counts what was
dropped per source.

Outputs in `--out`:
    train.jsonl, heldout.jsonl   one document per line: {"id", "source", "kind": "chat", "messages": [...]} or
                                 {"id", "source", "kind": "text", "text": ...}; held-out = a fixed hash of the
                                 id (validation loss of the pretraining, never trained on)
    manifest.json                sources (file, license, sha256, documents, characters), outputs (documents,
                                 characters, bytes, sha256), the overlap report, and the build key

The stage is cached: a second run with the same inputs and options finds the manifest's build key and returns.
No document contains the tokenizer's special-token strings (`<|bos|>`, ... `<|mask|>`); the build checks it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import sysconfig
from pathlib import Path
from pydoc_data.topics import topics
from typing import Iterable, Iterator

from hdflash_jax.cli import run_command
from hdflash_jax.fileio import OutputKind, check_output, has_files, read_jsonl
from hdflash_jax.suites import DATA_DIR as EVAL_DIR
from hdflash_jax.suites import FILES, HUMANEVAL_TEMPLATE, MATH_INSTRUCTION, MBPP_TEMPLATE, load_suite

DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS_VERSION = 1  # bump when the document formatting changes (invalidates cached corpora)

GSM8K_FILE = "gsm8k/train.jsonl"
MBPP_FILE = "mbpp/mbpp_nontest.jsonl"
STDLIB_FILE = "python_stdlib/stdlib.jsonl"
TOPICS_FILE = "python_stdlib/pydoc_topics.jsonl"

SOURCES = {
    "gsm8k_train": {"file": GSM8K_FILE, "license": "MIT (openai/grade-school-math)"},
    "mbpp_nontest": {"file": MBPP_FILE, "license": "CC-BY-4.0 (google-research MBPP)"},
    "python_stdlib": {"file": STDLIB_FILE, "license": "PSF-2.0 (CPython 3.11.7 Lib/, see python_stdlib/LICENSE.txt)"},
    "pydoc_topics": {"file": TOPICS_FILE, "license": "PSF-2.0 (CPython 3.11.7 pydoc_data/topics.py)"},
}

# MBPP splits (Austin et al. 2021): 1-10 few-shot prompts, 11-510 test (held out), 511-600 validation, 601-974 train.
MBPP_TEST_IDS = range(11, 511)
MBPP_NONTEST_IDS = set(range(1, 11)) | set(range(511, 975))

# The tokenizer's special tokens (train.tokenizer_train uses these strings); they must never occur in the text.
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|mask|>")

STDLIB_MAX_BYTES = 64_000
STDLIB_SKIP = {"this.py", "antigravity.py"}  # rot13'd Zen; a web-browser joke


# ---- document formatting ------------------------------------------------------------------------------------

def _templates():

    return MATH_INSTRUCTION, MBPP_TEMPLATE, HUMANEVAL_TEMPLATE


def gsm8k_answer_text(answer: str) -> str:
    """GSM8K's solution as a chat answer: calculator annotations removed, `#### x` → `The answer is \\boxed{x}.`"""
    body, _, final = answer.rpartition("####")
    body = re.sub(r"<<[^<>]*>>", "", body if final else answer).rstrip()
    final = final.strip()
    return f"{body}\nThe answer is \\boxed{{{final}}}." if final else body


def gsm8k_documents(rows: Iterable[dict]) -> Iterator[dict]:
    math_instruction, _, _ = _templates()
    for i, r in enumerate(rows):
        yield {"id": f"gsm8k_train/{i}", "source": "gsm8k_train", "kind": "chat", "messages": [
            {"role": "user", "content": f"{r['question']}\n{math_instruction}"},
            {"role": "assistant", "content": gsm8k_answer_text(r["answer"])}]}


def mbpp_documents(rows: Iterable[dict]) -> Iterator[dict]:
    _, mbpp_template, _ = _templates()
    for r in rows:
        if r["task_id"] not in MBPP_NONTEST_IDS:
            raise ValueError(f"mbpp task {r['task_id']} is in the held-out test split (11-510)")
        code = r["code"].replace("\r\n", "\n").replace("\r", "\n").strip("\n")
        prompt = mbpp_template.format(text=r["text"], tests="\n".join(r["test_list"]))
        yield {"id": f"mbpp/{r['task_id']}", "source": "mbpp_nontest", "kind": "chat", "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": f"```python\n{code}\n```"}]}


def stdlib_documents(rows: Iterable[dict]) -> Iterator[dict]:
    for r in rows:
        yield {"id": f"python_stdlib/{r['path']}", "source": "python_stdlib", "kind": "text", "text": r["text"]}


def topic_documents(rows: Iterable[dict]) -> Iterator[dict]:
    for r in rows:
        yield {"id": f"pydoc_topics/{r['topic']}", "source": "pydoc_topics", "kind": "text", "text": r["text"]}


def document_texts(doc: dict) -> list[str]:
    """The raw text pieces of a document (message contents, or the text): what n-grams and tokenizers see."""
    if doc["kind"] == "chat":
        return [m["content"] for m in doc["messages"]]
    return [doc["text"]]


def iter_documents(data_dir: Path = DATA_DIR) -> Iterator[dict]:
    """Every candidate training document from the vendored sources, in a fixed order."""
    yield from gsm8k_documents(read_jsonl(data_dir / GSM8K_FILE))
    yield from mbpp_documents(read_jsonl(data_dir / MBPP_FILE))
    yield from stdlib_documents(read_jsonl(data_dir / STDLIB_FILE))
    yield from topic_documents(read_jsonl(data_dir / TOPICS_FILE))


# ---- overlap with the evaluation prompts -------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric runs: punctuation, whitespace and formatting never hide an overlap."""
    return _WORD.findall(text.lower())


def _grams(ws: list[str], n: int) -> Iterator[tuple[str, ...]]:
    for i in range(len(ws) - n + 1):
        yield tuple(ws[i:i + n])


def _template_segments() -> list[str]:
    """The fixed text of the evaluation templates (placeholders removed, at least 3 words each)."""
    out = []
    for t in _templates():
        out.extend(seg.strip() for seg in re.split(r"\{[a-z_]+\}", t) if len(words(seg)) >= 3)
    return out


_SPLITTER: re.Pattern | None = None


def content_pieces(text: str) -> list[str]:
    """`text` cut at every occurrence of the evaluation templates' fixed text.

    Training prompts use the same templates as the evaluation (by design), so an n-gram that runs from a
    template's words into a few words of content would match between unrelated problems; n-grams are therefore
    taken inside each piece of content, never across a template boundary.
    """
    global _SPLITTER
    if _SPLITTER is None:
        segs = sorted(set(_template_segments()), key=len, reverse=True)
        _SPLITTER = re.compile("|".join(re.escape(s) for s in segs))
    return [p for p in _SPLITTER.split(text) if p.strip()]


class EvalIndex:
    """Word n-grams of every evaluation prompt's content pieces (a piece shorter than n words: the whole piece)."""

    def __init__(self, texts: dict[str, list[str]], n: int = 13, min_words: int = 4):
        self.n = n
        self.grams: dict[tuple[str, ...], str] = {}
        self.short: dict[int, dict[tuple[str, ...], str]] = {}  # length -> {whole prompt words: sample id}
        for sid, turns in texts.items():
            for piece in (p for turn in turns for p in content_pieces(turn)):
                ws = words(piece)
                if len(ws) >= n:
                    for g in _grams(ws, n):
                        self.grams.setdefault(g, sid)
                elif len(ws) >= min_words:
                    self.short.setdefault(len(ws), {}).setdefault(tuple(ws), sid)
        self.n_samples = len(texts)

    @classmethod
    def from_suites(cls, suites: str = "all", n: int = 13, data_dir=None) -> "EvalIndex":

        samples = load_suite(suites, data_dir=data_dir)
        return cls({s.id: list(s.turns) for s in samples}, n=n)

    def matches(self, text: str) -> list[tuple[str, str]]:
        """(evaluation sample id, the shared words) for every overlap of `text` with the index."""
        hits = []
        for piece in content_pieces(text):
            ws = words(piece)
            for g in _grams(ws, self.n):
                sid = self.grams.get(g)
                if sid is not None:
                    hits.append((sid, " ".join(g)))
            for length, table in self.short.items():
                for g in _grams(ws, length):
                    sid = table.get(g)
                    if sid is not None:
                        hits.append((sid, " ".join(g)))
        return hits


def find_overlaps(docs: Iterable[dict], index: EvalIndex) -> list[dict]:
    """Training documents that share an n-gram with an evaluation prompt: [{doc, source, eval_id, ngram}]."""
    out = []
    for doc in docs:
        for text in document_texts(doc):
            hits = index.matches(text)
            if hits:
                sid, gram = hits[0]
                out.append({"doc": doc["id"], "source": doc["source"], "eval_id": sid, "ngram": gram,
                            "n_hits": len(hits)})
                break
    return out


# ---- build -------------------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_heldout(doc_id: str, frac: float) -> bool:
    """A fixed split by the id's hash (independent of order, seeds and the other documents)."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return h < frac * 2 ** 64


def check_special_free(doc: dict) -> None:
    for text in document_texts(doc):
        for s in SPECIAL_TOKENS:
            if s in text:
                raise ValueError(f"{doc['id']}: contains the special token string {s!r}")


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    tmp.replace(path)


def build_key(data_dir: Path, heldout_frac: float, ngram: int) -> dict:

    return {"version": CORPUS_VERSION, "code": sha256_file(Path(__file__)), "heldout_frac": heldout_frac,
            "ngram": ngram,
            "sources": {k: sha256_file(data_dir / v["file"]) for k, v in SOURCES.items()},
            "eval": {k: sha256_file(EVAL_DIR / f) for k, f in sorted(FILES.items())}}


def build_corpus(out: str | Path, *, heldout_frac: float = 0.02, ngram: int = 13, data_dir: Path = DATA_DIR,
                 force: bool = False, log=print) -> dict:
    """Build (or find cached) train/heldout documents in `out`; returns the manifest."""
    out = Path(out)
    key = build_key(data_dir, heldout_frac, ngram)
    mf = out / "manifest.json"
    if mf.is_file() and not force:
        manifest = json.loads(mf.read_text())
        if manifest.get("build_key") == key and all((out / o).is_file() for o in manifest["outputs"]):
            log(f"corpus: cached at {out} (build key matches)")
            return manifest
    out.mkdir(parents=True, exist_ok=True)
    index = EvalIndex.from_suites("all", n=ngram)
    log(f"corpus: evaluation index: {index.n_samples} prompts, {len(index.grams)} {ngram}-grams")
    docs = list(iter_documents(data_dir))
    for d in docs:
        check_special_free(d)
    overlaps = find_overlaps(docs, index)
    dropped = {o["doc"] for o in overlaps}
    kept = [d for d in docs if d["id"] not in dropped]
    train = [d for d in kept if not is_heldout(d["id"], heldout_frac)]
    heldout = [d for d in kept if is_heldout(d["id"], heldout_frac)]
    after = find_overlaps(train + heldout, index)
    if after:
        raise RuntimeError(f"corpus: {len(after)} documents still overlap the evaluation prompts: {after[:3]}")
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "heldout.jsonl", heldout)

    def stats(ds):
        by = {}
        for d in ds:
            s = by.setdefault(d["source"], {"documents": 0, "characters": 0})
            s["documents"] += 1
            s["characters"] += sum(len(t) for t in document_texts(d))
        return by

    sources = {}
    for name, meta in SOURCES.items():
        p = data_dir / meta["file"]
        sources[name] = {"file": f"train/data/{meta['file']}", "license": meta["license"],
                         "bytes": p.stat().st_size, "sha256": key["sources"][name],
                         **stats([d for d in docs if d["source"] == name]).get(name, {})}
    manifest = {
        "build_key": key,
        "sources": sources,
        "outputs": {f: {"bytes": (out / f).stat().st_size, "sha256": sha256_file(out / f),
                        "documents": len(ds), "by_source": stats(ds)}
                    for f, ds in (("train.jsonl", train), ("heldout.jsonl", heldout))},
        "overlap": {"ngram": ngram, "eval_prompts": index.n_samples, "eval_ngrams": len(index.grams),
                    "dropped_documents": len(dropped),
                    "dropped_by_source": {s: sum(o["source"] == s for o in overlaps) for s in SOURCES},
                    "dropped": overlaps, "overlap_after_filtering": len(after)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    log(f"corpus: {len(train)} train / {len(heldout)} held-out documents "
        f"({manifest['outputs']['train.jsonl']['bytes'] / 1e6:.2f} MB train); dropped {len(dropped)} overlapping "
        f"documents {manifest['overlap']['dropped_by_source']}; wrote {out}")
    return manifest


# ---- vendoring (maintainers) -------------------------------------------------------------------------------

def vendor_stdlib(data_dir: Path = DATA_DIR) -> None:
    """Re-extract the stdlib text from the running interpreter (must be CPython 3.11.7 to reproduce the files)."""

    if sys.version_info[:3] != (3, 11, 7):
        print(f"warning: running Python {sys.version.split()[0]}, the vendored files come from 3.11.7")
    lib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for p in sorted(lib.glob("*.py")):
        if p.name.startswith("_") or p.name in STDLIB_SKIP or p.stat().st_size > STDLIB_MAX_BYTES:
            continue
        rows.append({"path": f"Lib/{p.name}", "text": p.read_text(encoding="utf-8")})

    topic_rows = [{"topic": k, "text": v} for k, v in sorted(topics.items())]
    d = data_dir / "python_stdlib"
    d.mkdir(parents=True, exist_ok=True)
    _write_jsonl(d / "stdlib.jsonl", rows)
    _write_jsonl(d / "pydoc_topics.jsonl", topic_rows)
    (d / "LICENSE.txt").write_bytes((lib / "LICENSE.txt").read_bytes())
    print(f"vendored {len(rows)} stdlib modules and {len(topic_rows)} pydoc topics into {d}")


CORPUS_FOLDER = OutputKind("a train.corpus folder (manifest.json)", has_files("manifest.json"))


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", help="output folder (train.jsonl, heldout.jsonl, manifest.json)")
    ap.add_argument("--heldout-frac", type=float, default=0.02)
    ap.add_argument("--ngram", type=int, default=13, help="n of the word n-gram overlap check")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cached build key matches")
    ap.add_argument("--vendor-stdlib", action="store_true", help="re-extract train/data/python_stdlib and exit")
    args = ap.parse_args(argv)
    if args.vendor_stdlib:
        vendor_stdlib()
        return 0
    if not args.out:
        ap.error("--out is required")
    check_output(args.out, flag="--out", kind=CORPUS_FOLDER, reuse=True,
                 inputs=[("the vendored data", DATA_DIR), ("the suites' data", EVAL_DIR)])
    build_corpus(args.out, heldout_frac=args.heldout_frac, ngram=args.ngram, force=args.force)
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
