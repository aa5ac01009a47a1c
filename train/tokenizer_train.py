"""Stage 2 of the built-in small model: a byte-level BPE tokenizer trained on the corpus.

    python -m train.tokenizer_train --corpus runs/small/corpus --out runs/small/tokenizer [--vocab-size 4096]

Writes to `--out`:
    tokenizer.json         a `tokenizers` file (`tokenizers.Tokenizer.from_file` loads it; so does
                           `hdflash_jax.tokenizer.HFTokenizer.from_file`, which picks BOS/EOS up from the next file)
    tokenizer_config.json  bos/eos/pad/mask token strings and ids, and the chat format (below)
    manifest.json          corpus manifest sha256, options, sha256 of tokenizer.json (the stage's cache key)

Id layout (fixed, checked after training): 0 `<|bos|>`, 1 `<|eos|>` (TargetConfig's default bos/eos ids), 2
`<|pad|>`, 3 `<|user|>`, 4 `<|assistant|>`, then 256 byte symbols and the merges, and last `<|mask|>` =
vocab_size − 1 (DrafterConfig.for_target's default mask token: reserved for the drafters' block slots, never in
any text, so the target never trains on it). Special tokens are atomic: written in text they encode to their one
id, and no merge can produce them.

Pre-tokenization: digits split one by one (arithmetic for a small model), then GPT-2's byte-level regex; the
byte-level decoder restores every input exactly (tested on code, whitespace and non-ASCII text).

Chat format (`render_chat`; one BOS per conversation, EOS after every assistant turn):

    <|bos|>{system}<|user|>{user}<|assistant|>{assistant}<|eos|><|user|>{user}<|assistant|>

A generation prompt ends with `<|assistant|>`; the model's answer ends at `<|eos|>`. So a rendered prompt plus
`encode(answer) + [eos]` is exactly the rendered conversation (special tokens split the text), which is how
`train.data.encode_record` builds drafter examples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hdflash_jax.cli import run_command
from hdflash_jax.fileio import OutputKind, check_output, has_files
from hdflash_jax.tokenizer import TAG_ASSISTANT as ASSISTANT
from hdflash_jax.tokenizer import TAG_BOS as BOS
from hdflash_jax.tokenizer import TAG_EOS as EOS
from hdflash_jax.tokenizer import TAG_MASK as MASK
from hdflash_jax.tokenizer import TAG_PAD as PAD
from hdflash_jax.tokenizer import TAG_USER as USER
from hdflash_jax.tokenizer import render_role_tags
from train.corpus import document_texts

LEADING_SPECIALS = (BOS, EOS, PAD, USER, ASSISTANT)  # ids 0..4, in this order; MASK is the last id
CHAT_FORMAT = "<|bos|>{system}<|user|>{user}<|assistant|>{assistant}<|eos|>"
TOKENIZER_VERSION = 1


def render_document(doc: dict) -> str:
    """A corpus document (train.corpus) as the string the target is pretrained on."""
    if doc["kind"] == "chat":
        return render_role_tags(doc["messages"], add_generation_prompt=False)
    return BOS + doc["text"] + EOS


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """A byte-level BPE `tokenizers.Tokenizer` with the fixed special-token layout (module docstring)."""

    n_fixed = len(LEADING_SPECIALS) + 1 + 256
    if vocab_size <= n_fixed:
        raise ValueError(f"vocab_size must exceed {n_fixed} (specials + 256 bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, min_frequency=min_frequency, special_tokens=list(LEADING_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([MASK])
    check_layout(tok, vocab_size)
    return tok


def check_layout(tok, vocab_size: int) -> None:
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise ValueError(f"tokenizer: vocabulary has {got} ids, expected {vocab_size} (corpus too small for the "
                         f"requested number of merges?)")
    for i, s in enumerate(LEADING_SPECIALS):
        if tok.token_to_id(s) != i:
            raise ValueError(f"tokenizer: {s} has id {tok.token_to_id(s)}, expected {i}")
    if tok.token_to_id(MASK) != vocab_size - 1:
        raise ValueError(f"tokenizer: {MASK} has id {tok.token_to_id(MASK)}, expected {vocab_size - 1}")


def tokenizer_config(vocab_size: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "mask_token": MASK,
        "additional_special_tokens": [USER, ASSISTANT],
        "ids": {"bos": 0, "eos": 1, "pad": 2, "user": 3, "assistant": 4, "mask": vocab_size - 1},
        "vocab_size": vocab_size,
        "chat_template": CHAT_FORMAT,
        "chat_template_name": "role_tags",  # hdflash_jax.tokenizer picks the renderer by this name
        "chat_format": {
            "conversation": "<|bos|> once, then per turn <|user|>{user} and <|assistant|>{assistant}<|eos|>; an "
                            "optional first system message is written right after <|bos|>",
            "generation_prompt": "ends with <|assistant|>; the answer ends at <|eos|>",
            "example": render_role_tags([{"role": "user", "content": "What is 2+3?"},
                                    {"role": "assistant", "content": "2+3 = 5"}], add_generation_prompt=False),
            "renderer": "train.tokenizer_train.render_chat",
        },
        "mask_token_note": "reserved for the block drafters (DrafterConfig.mask_token_id = vocab_size - 1); never "
                           "appears in training text",
    }


def _corpus_texts(corpus_dir: Path) -> Iterator[str]:

    with open(corpus_dir / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            yield from document_texts(json.loads(line))


def build_tokenizer(corpus_dir: str | Path, out: str | Path, *, vocab_size: int = 4096, force: bool = False,
                    log=print) -> Path:
    """Train (or find cached) the tokenizer of `corpus_dir` into `out`; returns the tokenizer.json path."""
    corpus_dir, out = Path(corpus_dir), Path(out)
    mf_corpus = corpus_dir / "manifest.json"
    if not mf_corpus.is_file():
        raise FileNotFoundError(f"{corpus_dir}: no manifest.json (build the corpus first: python -m train.corpus)")
    key = {"version": TOKENIZER_VERSION, "vocab_size": vocab_size,
           "corpus_manifest_sha256": hashlib.sha256(mf_corpus.read_bytes()).hexdigest(),
           "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}
    mf = out / "manifest.json"
    if mf.is_file() and not force and (out / "tokenizer.json").is_file():
        if json.loads(mf.read_text()).get("build_key") == key:
            log(f"tokenizer: cached at {out}")
            return out / "tokenizer.json"
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(_corpus_texts(corpus_dir), vocab_size=vocab_size)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(vocab_size), indent=1))
    sha = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    # a quick measure of the compression on the held-out split
    held = [json.loads(line) for line in open(corpus_dir / "heldout.jsonl", encoding="utf-8")]
    text = [render_document(d) for d in held]
    n_tok = sum(len(e.ids) for e in tok.encode_batch(text, add_special_tokens=False))
    n_chr = sum(len(t) for t in text)
    mf.write_text(json.dumps({"build_key": key, "tokenizer_sha256": sha, "vocab_size": vocab_size,
                              "heldout_chars_per_token": round(n_chr / max(n_tok, 1), 3)}, indent=1))
    log(f"tokenizer: vocab {vocab_size}, {n_chr / max(n_tok, 1):.2f} characters/token on the held-out split; "
        f"wrote {out}")
    return out / "tokenizer.json"


TOKENIZER_FOLDER = OutputKind("a train.tokenizer_train folder (tokenizer.json)", has_files("tokenizer.json"))


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="corpus folder (python -m train.corpus --out ...)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    check_output(args.out, flag="--out", kind=TOKENIZER_FOLDER, reuse=True, inputs=[("the --corpus", args.corpus)])
    build_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size, force=args.force)
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
