"""DeepSeek-V4 chat rendering: an assistant's reasoning under either message key."""

from hdflash_jax.tokenizer import ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER, render_deepseek_v4


def _agent_turns(**reasoning):
    """user, assistant (after the last user turn: its reasoning is kept in thinking mode), assistant."""
    return [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", **reasoning},
            {"role": "assistant", "content": "done"}]


def test_reasoning_content_is_rendered_in_thinking_mode():
    want = f"{BOS}{USER}2+2?{ASSISTANT}{THINK_START}add{THINK_END}4{EOS}{THINK_END}done{EOS}"
    # DeepSeek's reference encoder reads `reasoning_content`; `reasoning` is accepted too
    assert render_deepseek_v4(_agent_turns(reasoning_content="add"), thinking=True) == want
    assert render_deepseek_v4(_agent_turns(reasoning="add"), thinking=True) == want
    # both present: the reference name wins
    assert render_deepseek_v4(_agent_turns(reasoning_content="add", reasoning="other"), thinking=True) == want
    # chat mode and turns before the last user turn drop it, under either name
    for key in ("reasoning_content", "reasoning"):
        msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", key: "WHY"},
                {"role": "user", "content": "c"}]
        assert render_deepseek_v4(msgs, thinking=True) == (
            f"{BOS}{USER}a{ASSISTANT}{THINK_END}b{EOS}{USER}c{ASSISTANT}{THINK_START}")
        assert "WHY" not in render_deepseek_v4(_agent_turns(**{key: "WHY"}))
