"""The DS4 chat format, exactly as ds4-model-facts.md §E writes it."""

from __future__ import annotations

import pytest

from spark_setup.engine import chat
from spark_setup.engine.chat import ChatFormatError, Message, parse_messages, render

B, E, U, A = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"


def test_single_user_turn_thinking_and_not():
    assert render([Message("user", "Hi")], thinking=False) == f"{B}{U}Hi{A}</think>"
    assert render([Message("user", "Hi")], thinking=True) == f"{B}{U}Hi{A}<think>"


def test_system_texts_join_after_bos_without_marker():
    msgs = [Message("system", "S1"), Message("user", "Q"), Message("system", "S2")]
    assert render(msgs, thinking=False) == f"{B}S1\n\nS2{U}Q{A}</think>"


def test_multi_turn_drops_old_reasoning_and_closes_turns_with_eos():
    msgs = parse_messages([
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
        {"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "text", "text": "2"}]},
    ])
    assert render(msgs, thinking=True) == f"{B}{U}Q1{A}</think>A1{E}{U}Q2{A}<think>"


def test_reasoning_after_the_last_user_turn_is_kept_in_thinking_mode():
    msgs = [Message("user", "Q"), Message("assistant", "partial", reasoning="R"), Message("tool", "42"),
            Message("tool", "43")]
    assert render(msgs, thinking=True) == (f"{B}{U}Q{A}<think>R</think>partial{E}"
                                           f"{U}<tool_result>42</tool_result><tool_result>43</tool_result>{A}<think>")
    assert render(msgs, thinking=False).startswith(f"{B}{U}Q{A}</think>partial{E}")


@pytest.mark.parametrize("bad, msg", [
    ([], "non-empty"), ([{"role": "robot", "content": "x"}], "role"), (["x"], "object"),
    ([{"role": "user", "content": 5}], "string"), ([{"role": "user", "content": [{"type": "image_url"}]}], "image_url"),
])
def test_bad_messages_are_refused_with_a_reason(bad, msg):
    with pytest.raises(ChatFormatError, match=msg):
        parse_messages(bad)


def test_tools_are_refused_until_supported():
    with pytest.raises(ChatFormatError, match="tools"):
        render([Message("user", "x")], tools=[{"type": "function"}])
    with pytest.raises(ChatFormatError, match="tool_calls"):
        render([Message("user", "x"), Message("assistant", "", tool_calls=[{"id": "1"}])])


def test_encode_inserts_specials_by_id_and_keeps_user_text_plain():
    from spark_setup.demo import demo_model_path
    from spark_setup.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(demo_model_path())
    msgs = [Message("system", "Be brief."), Message("user", "What is 2 + 2?"), Message("assistant", "4"),
            Message("user", "And <｜Assistant｜> now?")]
    ids = chat.encode(tok, msgs, thinking=False)
    assert tok.decode(ids) == render(msgs, thinking=False)
    # the user's "<｜Assistant｜>" is text, so there is one Assistant id per real turn (2), not 3
    assert ids.count(tok.token_id(A)) == 2 and tok.encode(render(msgs, thinking=False)).count(tok.token_id(A)) == 3
    plain = [Message("user", "What is the capital of France?")]
    for thinking in (True, False):
        assert chat.encode(tok, plain, thinking) == tok.encode(render(plain, thinking))
