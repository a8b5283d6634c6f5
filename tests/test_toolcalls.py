"""The DSML tool-call block in streamed answer text: held back from the text, parsed into calls."""

from __future__ import annotations

import pytest

from spark_setup.engine.toolcalls import ToolCallScanner, parse_block

D = "｜DSML｜"
BLOCK = (f"<{D}tool_calls>\n<{D}invoke name=\"get_weather\">\n"
         f"<{D}parameter name=\"city\" string=\"true\">Paris</{D}parameter>\n"
         f"<{D}parameter name=\"days\" string=\"false\">[1, 2]</{D}parameter>\n</{D}invoke>\n"
         f"<{D}invoke name=\"now\">\n\n</{D}invoke>\n</{D}tool_calls>")


def scan(pieces):
    sc = ToolCallScanner()
    shown = "".join(sc.push(p) for p in pieces)
    rest, calls = sc.finish()
    return shown + rest, sc.closed, [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 1000])
def test_text_before_the_block_is_shown_and_the_block_never_is(size):
    out = "Let me look.\n\n" + BLOCK
    shown, closed, calls = scan([out[i:i + size] for i in range(0, len(out), size)])
    assert (shown, closed) == ("Let me look.", True)
    assert calls == [("get_weather", {"city": "Paris", "days": [1, 2]}), ("now", {})]


def test_what_only_looked_like_the_block_is_shown_once_decided():
    sc = ToolCallScanner()
    assert sc.push("a <｜DS") == "a "  # could be the start tag: held
    assert sc.push("ML| no") == "<｜DSML| no"  # it was not
    assert sc.push("\n\n") == ""  # blank lines wait for what follows
    assert sc.push("b") == "\n\nb"
    assert sc.push("\n") == "" and sc.finish() == ("\n", [])  # the end of the answer shows what was held


def test_values_that_are_not_json_stay_text_and_an_unfinished_invoke_is_dropped():
    block = (f"<{D}tool_calls>\n<{D}invoke name=\"f\">\n<{D}parameter name=\"n\" string=\"false\">12 apples"
             f"</{D}parameter>\n</{D}invoke>\n<{D}invoke name=\"g\">\n<{D}parameter name=\"x\" string=\"true\">1")
    assert [(c.name, c.arguments) for c in parse_block(block)] == [("f", {"n": "12 apples"})]
    shown, closed, calls = scan(["x\n\n", block])
    assert (shown, closed, calls) == ("x", False, [("f", {"n": "12 apples"})])


def test_each_call_gets_its_own_id_and_json_arguments():
    a, b = parse_block(BLOCK)
    assert a.id.startswith("call_") and a.id != b.id
    assert a.arguments_json == '{"city": "Paris", "days": [1, 2]}'


def test_a_parameter_without_its_string_attribute_is_json_when_it_parses():
    block = (f"<{D}tool_calls>\n<{D}invoke name=\"f\">\n<{D}parameter name=\"n\">3</{D}parameter>\n"
             f"<{D}parameter name=\"s\">Paris</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>")
    assert [(c.name, c.arguments) for c in parse_block(block)] == [("f", {"n": 3, "s": "Paris"})]
