"""Training data for the drafters: JSONL conversations → padded token rows, response loss masks, anchors; a grain
pipeline whose iterator state is checkpointed with the model.

Records (one JSON object per line), any of:
    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}
        (the last message is the response; the ones before it are the prompt)
    {"prompt_ids": [...], "response_ids": [...], "stop": "eos" | "length"}
        (exact ids, e.g. written by `train.regenerate`; preferred when present, so nothing is lost to
        re-tokenisation; EOS is appended unless "stop" is "length", i.e. the generation was cut)

Tokenisation (`encode_record`): prompt ids = encode(apply_chat_template(prompt messages, add_generation_prompt=True)),
response ids = encode(response) + [eos]. A sequence is prompt + response cut to `max_len`, right-padded with the
tokenizer's pad id (its EOS when it has none); `loss_mask` is 1 on response tokens only (the EOS included);
`positions` are 0..max_len−1 (right padding: real tokens keep their absolute positions, and the causal target
never lets a pad token influence a real one).

Anchors: per sequence and epoch, `num_anchors` positions a with loss_mask[a] = loss_mask[a+1] = 1 drawn
uniformly without replacement and sorted; with fewer candidates all are taken and `keep` marks the real ones
(the rest are 0 with keep = False). The draw is `np.random.default_rng([seed, epoch, record_id])`: the same on
every host and after a resume, different each epoch.

The tokenizer is any object with `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `eos_id`,
`mask_id` and `apply_chat_template(messages, add_generation_prompt=True)` (returning text to encode, or ids);
`pad_id` is optional (`hdflash_jax.tokenizer.load_tokenizer` gives one from 'byte[:N]', 'deepseek-v4', a
tokenizer.json or its folder).

The pipeline (`make_batches`):

    records = grain.MapDataset.source(JsonlSource(path)).map_with_index(tag with record id)
    shuffled = records.shuffle(seed)       # grain reshuffles per epoch for indices past len (seed + epoch)
    grain.MapDataset.range(num_batches * local_batch)
        .map(global element index of this host's rows)    # global batch k = elements k·G .. k·G+G−1
        .map(fetch from `shuffled`, tokenise, sample anchors for (seed, epoch, record id))
        .batch(local_batch, drop_remainder=True)
        .to_iter_dataset(...)              # iterator: get_state() / set_state() resume exactly

so every host reads only its own rows of each global batch (`rows`), and the global batch is the same
whatever the number of hosts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import grain
import numpy as np

from hdflash_jax.training.features import offline_example

# ---- tokenizers ------------------------------------------------------------------------------------------------

def pad_id_of(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    return int(tokenizer.eos_id if pad is None else pad)


def prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """The generation prompt of a conversation (ends where the assistant's answer starts)."""
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    return [int(i) for i in out] if not isinstance(out, str) else tokenizer.encode(out)


# ---- records ---------------------------------------------------------------------------------------------------

def prompt_messages(record: dict, where: str = "record") -> list[dict]:
    """The prompt part of a record as chat messages."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        if msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise ValueError(f"{where}: 'messages' has no prompt before the assistant turn")
        return msgs
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise ValueError(f"{where}: 'prompt' must be a string")
        return [{"role": "user", "content": record["prompt"]}]
    raise ValueError(f"{where}: needs 'prompt_ids', 'prompt' or 'messages' (keys: {sorted(record)})")


def response_text(record: dict, where: str = "record") -> str:
    if "response" in record:
        if not isinstance(record["response"], str):
            raise ValueError(f"{where}: 'response' must be a string")
        return record["response"]
    msgs = record.get("messages")
    if isinstance(msgs, list) and msgs and msgs[-1].get("role") == "assistant":
        return msgs[-1].get("content", "") or ""
    raise ValueError(f"{where}: no response ('response', 'response_ids' or a final assistant message)")


def encode_record(tokenizer, record: dict, where: str = "record") -> tuple[list[int], list[int]]:
    """(prompt ids, response ids ending in EOS)."""
    if "prompt_ids" in record:
        p = [int(i) for i in record["prompt_ids"]]
    else:
        p = prompt_ids(tokenizer, prompt_messages(record, where))
    if "response_ids" in record:
        r = [int(i) for i in record["response_ids"]]
        if record.get("stop", "eos") != "length" and (not r or r[-1] != tokenizer.eos_id):
            r = r + [int(tokenizer.eos_id)]  # a finished response ends in EOS; a cut one ("stop": "length") not
    else:
        r = tokenizer.encode(response_text(record, where)) + [int(tokenizer.eos_id)]
    return p, r


def build_example(prompt: Sequence[int], response: Sequence[int], max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded row: tokens [S] int32, loss_mask [S] bool (response only), positions [S], length []."""
    ids = (list(prompt) + list(response))[:max_len]
    n = len(ids)
    tokens = np.full((max_len,), pad_id, np.int32)
    tokens[:n] = ids
    loss_mask = np.zeros((max_len,), bool)
    loss_mask[min(len(prompt), n):n] = True
    return dict(tokens=tokens, loss_mask=loss_mask, positions=np.arange(max_len, dtype=np.int32),
                length=np.int32(n))


def sample_anchors(loss_mask: np.ndarray, num_anchors: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(anchors [N] int32 sorted, keep [N] bool): a with loss_mask[a] & loss_mask[a+1], without replacement."""
    lm = np.asarray(loss_mask, bool)
    cand = np.flatnonzero(lm[:-1] & lm[1:])
    k = min(num_anchors, cand.size)
    anchors = np.zeros((num_anchors,), np.int32)
    keep = np.zeros((num_anchors,), bool)
    if k:
        anchors[:k] = np.sort(rng.choice(cand, size=k, replace=False))
        keep[:k] = True
    return anchors, keep


def anchor_rng(seed: int, epoch: int, record_id: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(record_id)])


# ---- sources ---------------------------------------------------------------------------------------------------

class JsonlSource:
    """Random access to the lines of a JSONL file (byte offsets indexed once; blank lines skipped).

    A `grain` data source: `len()` and `[i]` → the parsed record (errors name the file and line).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"{self.path}: data file not found")
        offsets, lines = [], []
        pos = 0
        with open(self.path, "rb") as f:
            for i, line in enumerate(f):
                if line.strip():
                    offsets.append(pos)
                    lines.append(i + 1)
                pos += len(line)
        if not offsets:
            raise ValueError(f"{self.path}: no records")
        self._offsets = np.asarray(offsets, np.int64)
        self._lines = np.asarray(lines, np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[index]))
            line = f.readline()
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}:{self._lines[index]}: not valid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{self.path}:{self._lines[index]}: expected a JSON object")
        return rec

    def where(self, index: int) -> str:
        return f"{self.path}:{self._lines[int(index)]}"

    def __repr__(self):
        return f"JsonlSource({self.path!r}, {len(self)} records)"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    src = JsonlSource(path)
    return [src[i] for i in range(len(src))]


# ---- the pipeline ----------------------------------------------------------------------------------------------

class _TagId:
    def __init__(self, n: int):
        self.n = n

    def __call__(self, index, record):
        return int(index) % self.n, record


class _GlobalIndex:
    """Local element i of this host → global element index: batch k = i // L, global row rows[i % L]."""

    def __init__(self, global_batch: int, rows: Sequence[int]):
        self.g, self.rows = global_batch, tuple(int(r) for r in rows)

    def __call__(self, i):
        i = int(i)
        k, j = divmod(i, len(self.rows))
        return k * self.g + self.rows[j]


class _Prepare:
    def __init__(self, shuffled, source, tokenizer, n_records: int, max_len: int, num_anchors: int, seed: int,
                 features=None, teacher_slots: int = 0):
        self.shuffled, self.source, self.tok = shuffled, source, tokenizer
        self.n, self.max_len, self.num_anchors, self.seed = n_records, max_len, num_anchors, seed
        self.pad = pad_id_of(tokenizer)
        self.features, self.teacher_slots = features, teacher_slots

    def __call__(self, g):
        epoch = g // self.n
        record_id, record = self.shuffled[g]
        where = self.source.where(record_id) if hasattr(self.source, "where") else f"record {record_id}"
        p, r = encode_record(self.tok, record, where)
        ex = build_example(p, r, self.max_len, self.pad)
        anchors, keep = sample_anchors(ex["loss_mask"], self.num_anchors, anchor_rng(self.seed, epoch, record_id))
        ex.update(anchors=anchors, keep=keep, record_id=np.int64(record_id), epoch=np.int64(epoch))
        if self.features is not None:  # offline: the record's captured arrays, the teacher's at this epoch's anchors
            ex.update(offline_example(self.features.record(record_id, tokens=ex["tokens"]), anchors,
                                      self.teacher_slots))
        return ex


def make_batches(source, tokenizer, *, max_len: int, num_anchors: int, global_batch: int, num_batches: int,
                 seed: int = 0, rows: Sequence[int] | None = None, features=None, teacher_slots: int = 0):
    """A grain `MapDataset` of `num_batches` batches holding this host's `rows` (global row indices, default all)
    of each global batch, in that order.

    source: a random-access sequence of records (`JsonlSource`, a list); each element of a batch is a dict of
    numpy arrays: tokens / loss_mask / positions [L, S], length [L], anchors / keep [L, N], record_id / epoch [L].
    `features` (a `hdflash_jax.training.features.FeatureReader` of this source): each row also carries its
    record's `features` [L, S, ...] and, with `teacher_slots` > 0, `teacher_hidden` [L, N, slots, D] gathered at
    the row's anchors (the offline batch; tokens and anchors exactly as online).
    """
    n = len(source)
    if n == 0:
        raise ValueError("data: no records")
    rows = tuple(range(global_batch)) if rows is None else tuple(int(r) for r in rows)
    if not rows or min(rows) < 0 or max(rows) >= global_batch or len(set(rows)) != len(rows):
        raise ValueError(f"data: rows {rows} must be distinct rows of the global batch of {global_batch}")
    records = grain.MapDataset.source(source).map_with_index(_TagId(n))
    shuffled = records.shuffle(seed)
    local = len(rows)
    return (grain.MapDataset.range(num_batches * local)
            .map(_GlobalIndex(global_batch, rows))
            .map(_Prepare(shuffled, source, tokenizer, n, max_len, num_anchors, seed, features, teacher_slots))
            .batch(local, drop_remainder=True))


def make_iterator(batches, *, prefetch: int = 2):
    """An iterator over `make_batches(...)` with `get_state()` / `set_state()` (a small JSON-able dict)."""
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))


def batches_per_epoch(n_records: int, global_batch: int) -> int:
    return max(n_records // global_batch, 1)


EMPTY_SHARE_WARNING = 0.25  # warn when at least this share of the records checked supervises nothing


def supervised_anchors(prompt: Sequence[int], response: Sequence[int], max_len: int) -> int:
    """Anchor candidates a record gives after the cut to `max_len` (a with loss_mask[a] = loss_mask[a+1] = 1, the
    rule of `sample_anchors`): 0 means the record trains nothing."""
    n = min(len(prompt) + len(response), max_len)
    return max(0, n - min(len(prompt), n) - 1)


def records_check(source, tokenizer, max_len: int, limit: int = 4096) -> dict[str, Any]:
    """A look at the first `limit` records before compiling: ids inside the vocabulary, and something to learn.

    Refuses (ValueError naming the file) data whose checked records give no supervised token at all (every
    response empty or cut off by `max_len`: the run would train on nothing and export an untrained drafter);
    warns when a large share of them gives none."""
    kept, total, empty = [], [], 0
    n = min(len(source), limit)
    for i in range(n):
        where = source.where(i) if hasattr(source, "where") else f"record {i}"
        p, r = encode_record(tokenizer, source[i], where)
        if max(p + r, default=0) >= tokenizer.vocab_size:
            raise ValueError(f"{where}: token id {max(p + r)} outside the tokenizer's vocabulary")
        total.append(len(r))
        kept.append(max(0, min(len(p) + len(r), max_len) - len(p)))
        empty += supervised_anchors(p, r, max_len) == 0
    name = getattr(source, "path", "the training data")
    checked = f"the {n} records" if n == len(source) else f"the first {n} of {len(source)} records"
    if empty == n:
        raise ValueError(f"{name}: no supervised token in {checked} (every response is empty or starts past "
                         f"data.max_len {max_len}); nothing to train on")
    if empty >= EMPTY_SHARE_WARNING * n:
        from hdflash_jax.distributed import log

        log(f"warning: {name}: {empty} of {checked} ({empty / n:.0%}) have no supervised token (an empty response, "
            f"or one cut off by data.max_len {max_len})")
    return dict(mean_response_tokens=float(np.mean(total)), mean_kept_response_tokens=float(np.mean(kept)),
                records_without_supervision=empty, records_checked=n)
