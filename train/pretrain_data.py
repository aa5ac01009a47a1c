"""The pretraining data of the small target: the corpus rendered and tokenized once (cached as uint16 under the
run folder, keyed by the inputs' hashes), and token windows drawn by step so a resumed run sees the same batches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from train.tokenizer_train import MASK, TOKENIZER_VERSION, render_document


def tokenize_corpus(corpus_dir: Path, tokenizer_json: Path, out_dir: Path, log=print) -> dict[str, np.ndarray]:
    """{"train", "heldout"}: the concatenated token ids of each split (chat documents in the chat format, text
    documents as <|bos|>text<|eos|>)."""
    key = hashlib.sha256((corpus_dir / "manifest.json").read_bytes() + tokenizer_json.read_bytes()
                         + f"render-v{TOKENIZER_VERSION}".encode()).hexdigest()[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(tokenizer_json))
    mask_id = tok.token_to_id(MASK)
    arrays = {}
    for split in ("train", "heldout"):
        f = out_dir / f"{split}-{key}.npy"
        if f.is_file():
            arrays[split] = np.load(f, mmap_mode="r")
            continue
        with open(corpus_dir / f"{split}.jsonl", encoding="utf-8") as fh:
            texts = [render_document(json.loads(line)) for line in fh]
        enc = tok.encode_batch(texts, add_special_tokens=False)
        ids = np.concatenate([np.asarray(e.ids, np.uint16) for e in enc])
        if tok.get_vocab_size(with_added_tokens=True) > 65535:
            raise ValueError("vocabulary too large for uint16 token files")
        if mask_id is not None and np.any(ids == mask_id):
            raise ValueError(f"{split}: the mask token occurs in the corpus")
        np.save(f, ids)
        log(f"data: {split}: {len(texts)} documents → {len(ids):,} tokens ({f.name})")
        arrays[split] = ids
    return arrays


def sample_windows(tokens: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    starts = rng.integers(0, len(tokens) - length, size=batch)
    return np.stack([np.asarray(tokens[s:s + length], np.int32) for s in starts])


def train_batch(tokens: np.ndarray, tc, step: int) -> np.ndarray:
    """Step `step`'s `tc.batch_size` windows of `tc.seq_len + 1` tokens (tc: a PretrainTrain)."""
    return sample_windows(tokens, tc.batch_size, tc.seq_len + 1, np.random.default_rng([tc.seed, step]))


def eval_windows(tokens: np.ndarray, tc) -> list[np.ndarray]:
    """`tc.eval_batches` fixed batches of held-out windows."""
    rng = np.random.default_rng([tc.seed, 10 ** 9])
    return [sample_windows(tokens, tc.batch_size, tc.seq_len + 1, rng) for _ in range(tc.eval_batches)]
