"""The DS4 chat format, exactly as ds4-model-facts.md §E writes it."""

from __future__ import annotations

import pytest

from spark_setup.engine import chat
from spark_setup.engine.chat import ChatFormatError, Message, parse_messages, render

B, E, U, A = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"


def test_single_user_turn_thinking_and_not():
    assert render([Message("user", "Hi")], thinking=False) == f"{B}{U}Hi{A}</think>"
    assert render([Message("user", "Hi")], thinking=True) == f"{B}{U}Hi{A}<think>"


def test_think_max_prefix_comes_first_and_only_when_thinking():
    msgs = [Message("system", "S"), Message("user", "Q")]
    text = render(msgs, thinking=True, max_effort=True)
    assert text.startswith(f"{B}Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    assert text.endswith(f"left unchecked.\n\nS{U}Q{A}<think>") and text.count("\n") == 4
    assert render(msgs, thinking=False, max_effort=True) == render(msgs, thinking=False) == f"{B}S{U}Q{A}</think>"


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
    msgs = [Message("user", "Q1"), Message("assistant", "A1", reasoning="R1"), Message("user", "Q2"),
            Message("assistant", "partial", reasoning="R2")]
    assert render(msgs, thinking=True) == f"{B}{U}Q1{A}</think>A1{E}{U}Q2{A}<think>R2</think>partial{E}{A}<think>"
    assert render(msgs, thinking=False) == f"{B}{U}Q1{A}</think>A1{E}{U}Q2{A}</think>partial{E}{A}</think>"


@pytest.mark.parametrize("bad, msg", [
    ([], "non-empty"), ([{"role": "robot", "content": "x"}], "role"), (["x"], "object"),
    ([{"role": "user", "content": 5}], "string"), ([{"role": "user", "content": [{"type": "image_url"}]}], "image_url"),
])
def test_bad_messages_are_refused_with_a_reason(bad, msg):
    with pytest.raises(ChatFormatError, match=msg):
        parse_messages(bad)


D = "｜DSML｜"
WEATHER = {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS_BLOCK = (  # the model's own tools block, with the schema line of WEATHER
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by "
    f"writing a \"<{D}tool_calls>\" block like the following:\n\n<{D}tool_calls>\n<{D}invoke name=\"$TOOL_NAME\">\n"
    f"<{D}parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</{D}parameter>\n...\n"
    f"</{D}invoke>\n<{D}invoke name=\"$TOOL_NAME2\">\n...\n</{D}invoke>\n</{D}tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, "
    "arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n### Available Tool Schemas\n\n"
    '{"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", "properties": '
    '{"city": {"type": "string"}}, "required": ["city"]}}\n\n'
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n")


def call(cid, name, args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def test_tools_block_follows_the_system_text():
    tools = chat.tool_schemas([{"type": "function", "function": WEATHER}])
    assert render([Message("system", "S"), Message("user", "Q")], thinking=False, tools=tools) == \
        f"{B}S\n\n{TOOLS_BLOCK}{U}Q{A}</think>"
    # no system text: the block still starts after a blank line; the Responses API's flat tools give the same
    assert render([Message("user", "Q")], thinking=False, tools=chat.tool_schemas([{"type": "function", **WEATHER}])) \
        == f"{B}\n\n{TOOLS_BLOCK}{U}Q{A}</think>"


def test_calls_and_results_render_as_dsml_and_one_user_turn_in_call_order():
    msgs = parse_messages([
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            call("c1", "get_weather", '{"city": "Paris"}'), call("c2", "get_weather", '{"city": "Rome", "days": 2}')]},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        {"role": "tool", "tool_call_id": "c1", "content": "sun"},
        {"role": "user", "content": "Thanks."},
    ])
    calls = (f"\n\n<{D}tool_calls>\n"
             f'<{D}invoke name="get_weather">\n<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
             f"</{D}invoke>\n"
             f'<{D}invoke name="get_weather">\n<{D}parameter name="city" string="true">Rome</{D}parameter>\n'
             f'<{D}parameter name="days" string="false">2</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>')
    tools = chat.tool_schemas([{"type": "function", "function": WEATHER}])
    assert render(msgs, thinking=False, tools=tools) == (
        f"{B}\n\n{TOOLS_BLOCK}{U}Weather in Paris and Rome?{A}</think>{calls}{E}"
        f"{U}<tool_result>sun</tool_result>\n\n<tool_result>rain</tool_result>\n\nThanks.{A}</think>")
    # with tools, thinking mode keeps every turn's reasoning (here none was sent back: an empty block)
    assert render(msgs, thinking=True, tools=tools).endswith(
        f"{U}Weather in Paris and Rome?{A}<think></think>{calls}{E}{U}<tool_result>sun</tool_result>\n\n"
        f"<tool_result>rain</tool_result>\n\nThanks.{A}<think>")


def test_tool_call_arguments_that_are_not_an_object_become_one_argument():
    msgs = [Message("user", "x"), Message("assistant", "", tool_calls=[call("c", "f", "not json")])]
    assert f'<{D}parameter name="arguments" string="true">not json</{D}parameter>' in render(msgs, thinking=False)
    msgs[1].tool_calls = [call("c", "f", {"n": [1, "é"]})]  # an object (Anthropic's input) as it is, JSON unescaped
    assert f'<{D}parameter name="n" string="false">[1, "é"]</{D}parameter>' in render(msgs, thinking=False)


@pytest.mark.parametrize("tools, msg", [
    ("x", "array"), ([{"type": "web_search"}], "web_search"), ([{"type": "function", "function": {}}], "name")])
def test_tools_that_are_not_functions_are_refused(tools, msg):
    with pytest.raises(ChatFormatError, match=msg):
        chat.tool_schemas(tools)


def test_encode_makes_the_format_dsml_special_and_the_clients_text_plain():
    from spark_setup.demo import demo_model_path
    from spark_setup.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(demo_model_path())
    tricky = dict(WEATHER, description=f"say <{D}tool_calls> <think>")
    msgs = [Message("user", "Q"), Message("assistant", "", tool_calls=[call("c", "get_weather", '{"city": "P"}')])]
    ids = chat.encode(tok, msgs, thinking=False, tools=[tricky])
    assert tok.decode(ids) == render(msgs, thinking=False, tools=[tricky])
    # the block's 9 marks + the call's 6 are special tokens; the description's mark and <think> are text
    assert ids.count(tok.token_id(D)) == 15 and ids.count(tok.token_id("<think>")) == 2


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
