"""A frozen target's scanned stacks as 16-bit words (`scan.stacks_as_words`, what the drafter trainer and its AOT
plan hand the step): the same bits, so the same outputs, and on XLA:CPU no fp32 copy of a stack in the compiled
program. The control of the HLO check is the plain bf16 program, whose HLO does hold those copies (the reason
words exist); the control of the equality is one flipped bit.

XLA:CPU cannot run a bf16 V4 target (its dot thunk has no bf16 x bf16 -> f32), plain or in words, so the bf16
program is only compiled here; the equality runs the same mechanism on an fp32 target with fp32 stacks carried as
uint32 words."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdflash_jax.config import get_preset
from hdflash_jax.deepseek_v4 import scan
from hdflash_jax.deepseek_v4.model import forward_full, init_target
from hdflash_jax.deepseek_v4.scan import stacks_as_words
from hdflash_jax.training.pure import PureModule

# one hash layer, three [CSA, HCA] units (a leading 3 that no activation has), an SWA tail layer
CFG = get_preset("tiny").replace(n_layers=8, n_hash_layers=1, compress_ratios=(0, 4, 8, 4, 8, 4, 8, 0),
                                 n_mtp_layers=0)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 16)), jnp.int32)


def _pure_and_tree(cfg):
    pure = PureModule(init_target(cfg, seed=1))
    return pure, pure.tree()


def _forward(pure):
    return jax.jit(lambda tree, tokens: forward_full(pure.merge(tree), tokens, return_layers=(0, 2, 7)))


def _stacks(tree, dtype):
    return [x for x in jax.tree.leaves(tree["scan"]) if x.dtype == dtype]


@pytest.fixture
def fp32_words(monkeypatch):
    monkeypatch.setattr(scan, "WORD_DTYPES", {jnp.dtype(jnp.float32): jnp.dtype(jnp.uint32)})


def test_words_are_the_same_bits_and_give_the_same_forward(fp32_words):
    pure, tree = _pure_and_tree(CFG)
    words = stacks_as_words(tree)
    n = len(_stacks(tree, jnp.float32))
    assert n and not _stacks(words, jnp.float32) and len(_stacks(words, jnp.uint32)) == n  # every stack, as words
    assert jax.tree.leaves(words["layers"])[0].dtype == jnp.float32  # unrolled layers stay as they are
    fn = _forward(pure)
    plain, worded = fn(tree, TOKENS), fn(words, TOKENS)
    for a, b in zip(jax.tree.leaves((plain.logits, plain.streams, plain.layer_streams)),
                    jax.tree.leaves((worded.logits, worded.streams, worded.layer_streams))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # control: one flipped bit in one word changes the forward, so the equality is not by construction
    w = words["scan"]["0"]["attn"]["wq_a"]["weight"]
    words["scan"]["0"]["attn"]["wq_a"]["weight"] = w.at[1, 0, 0].set(w[1, 0, 0] ^ jnp.uint32(1 << 29))
    assert not np.array_equal(np.asarray(fn(words, TOKENS).logits), np.asarray(plain.logits))


def test_no_fp32_copy_of_a_bf16_stack_on_xla_cpu():
    """The compiled HLO (XLA:CPU) holds no f32 array shaped like a bf16 stack when the stacks come as words, and
    the temp shrinks by at least their fp32 bytes; the plain bf16 program has them (float normalisation widens the
    sliced stack and moves the copy out of the loop)."""
    pure, tree = _pure_and_tree(CFG.replace(dtype="bfloat16", param_dtype="bfloat16"))
    fn = _forward(pure)
    stacks = _stacks(tree, jnp.bfloat16)
    native = {x.shape for x in jax.tree.leaves(tree) if x.dtype == jnp.float32}  # fp32 params: not copies
    shapes = {"f32[" + ",".join(map(str, x.shape)) + "]" for x in stacks if x.shape not in native}

    def compiled(t):
        exe = fn.lower(t, TOKENS).compile()
        hlo = exe.as_text()
        return {s for s in shapes if re.search(re.escape(s) + r"\{", hlo)}, exe.memory_analysis().temp_size_in_bytes

    (plain, plain_temp), (words, words_temp) = compiled(tree), compiled(stacks_as_words(tree))
    assert plain  # control: the plain program holds them
    assert not words, words
    assert plain_temp - words_temp >= 0.9 * sum(4 * x.size for x in stacks), (plain_temp, words_temp)
