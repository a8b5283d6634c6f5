"""The DS4 chat format (ds4-model-facts.md §E; tool calls and tool results as the model's own encoder writes them:
deepseek-ai/DeepSeek-V4-Flash encoding/encoding_dsv4.py, read for the format only): messages in, one prompt out.

    BOS + system text (joined by "\\n\\n", no marker) [+ "\\n\\n" + the tools block, when the request has tools]
      + for each turn:  <｜User｜>{parts}   a run of user messages and tool results, parts joined by "\\n\\n"; a
                                           tool result is <tool_result>{content}</tool_result>, the results of one
                                           assistant turn in the order of its calls
                        <｜Assistant｜></think>{content}[tool calls]<｜end▁of▁sentence｜>       (finished turn)
                        <｜Assistant｜><think>{reasoning}</think>{content}[tool calls]<｜end…｜> (same, in thinking
                                           mode after the last user turn, or in every turn when the request has
                                           tools: its reasoning is kept)
      + <｜Assistant｜><think>     (thinking)   or   <｜Assistant｜></think>   (non-thinking)

Tool calls: "\\n\\n<｜DSML｜tool_calls>\\n" + invokes joined by "\\n" + "\\n</｜DSML｜tool_calls>"; an invoke is
<｜DSML｜invoke name="N">\\n{parameters joined by "\\n"}\\n</｜DSML｜invoke>, a parameter
<｜DSML｜parameter name="K" string="true">text</｜DSML｜parameter> for strings, string="false" with JSON otherwise.

`render` gives the text (special tokens as their strings, for the tokenizer to find by string); `encode` gives the
ids the way ds4 does: specials inserted by id (｜DSML｜, <think> and </think> of the format included), the texts
between them encoded as plain text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ..errors import UserError
from .tokenizer import ASSISTANT, BOS, DSML, END_THINK, EOS, THINK, USER

ROLES = ("system", "user", "assistant", "tool")


class ChatFormatError(UserError):
    """A request the chat format cannot render (bad role, unsupported feature)."""


@dataclass
class Message:
    role: str
    content: str = ""
    reasoning: str | None = None  # an assistant turn's thinking text, if the client sent it back
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's shape: {id, type, function: {name,
    #                                                                 arguments: JSON text or an object}}
    tool_call_id: str | None = None  # a tool result: the call it answers


def content_text(content: Any, where: str = "message content", types: tuple[str, ...] = ("text",)) -> str:
    """The text of a content: a string, None, or a list of parts whose `type` is one of `types` (OpenAI's "text";
    the other APIs name theirs input_text, output_text); any other part is refused, named by `where`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") in types and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatFormatError(f"{where}[{j}] of type {kind!r} is not supported (text only: no images or "
                                      f"files)")
        return "".join(texts)
    raise ChatFormatError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")


def parse_messages(raw: Any) -> list[Message]:
    """OpenAI-style message dicts -> Messages, with errors a client can act on."""
    if not isinstance(raw, list) or not raw:
        raise ChatFormatError("'messages' must be a non-empty array")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"messages[{i}] must be an object")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ChatFormatError(f"messages[{i}].reasoning_content must be a string")
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list):
            raise ChatFormatError(f"messages[{i}].tool_calls must be an array")
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or \
                    not isinstance(fn.get("arguments", "{}"), (str, Mapping)):
                raise ChatFormatError(f"messages[{i}].tool_calls[{j}] must be {{\"function\": {{\"name\": ..., "
                                      f"\"arguments\": ...}}}}")
        call_id = m.get("tool_call_id")
        out.append(Message(role, content_text(m.get("content"), f"messages[{i}].content"), reasoning, list(calls),
                           call_id if isinstance(call_id, str) else None))
    return out


def tool_schemas(tools: Any) -> list[dict[str, Any]]:
    """The function definitions of OpenAI-style `tools` ([{type: function, function: {...}}] or the Responses API's
    flat [{type: function, name, ...}]), as the tools block lists them."""
    if not isinstance(tools, list):
        raise ChatFormatError("'tools' must be an array")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, Mapping) or t.get("type", "function") != "function":
            kind = t.get("type") if isinstance(t, Mapping) else type(t).__name__
            raise ChatFormatError(f"tools[{i}] of type {kind!r} is not supported (function tools only)")
        fn = t.get("function", {k: v for k, v in t.items() if k != "type"})
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatFormatError(f"tools[{i}] needs a function name")
        out.append(dict(fn))
    return out


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


Segment = tuple[str, bool]  # (text, is_special_token)

# Think-Max: right after BOS, in thinking mode, when a request asks for the most reasoning effort (ds4-model-facts
# §E; the text as the model's encoder writes it)
MAX_EFFORT_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")

# The tools block after the system text. {D}, {T}, {/T}: the ｜DSML｜, <think> and </think> special tokens.
_TOOLS_BLOCK = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{D}tool_calls>" block like the following:

<{D}tool_calls>
<{D}invoke name="$TOOL_NAME">
<{D}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{D}parameter>
...
</{D}invoke>
<{D}invoke name="$TOOL_NAME2">
...
</{D}invoke>
</{D}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {T}), you MUST output your complete reasoning inside {T}...{/T} BEFORE any tool calls or final response.

Otherwise, output directly after {/T} with tool calls or final response.

### Available Tool Schemas

{SCHEMAS}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""
_MARKS = {"{D}": DSML, "{T}": THINK, "{/T}": END_THINK}


def _template(text: str) -> list[Segment]:
    """Our own template text with its special-token marks as special segments."""
    out: list[Segment] = []
    i = 0
    while i < len(text):
        j = min((k for k in (text.find(m, i) for m in _MARKS) if k >= 0), default=len(text))
        if j > i:
            out.append((text[i:j], False))
        if j < len(text):
            mark = next(m for m in _MARKS if text.startswith(m, j))
            out.append((_MARKS[mark], True))
            j += len(mark)
        i = j
    return out


def tools_block(tools: Sequence[dict[str, Any]]) -> list[Segment]:
    head, tail = _TOOLS_BLOCK.split("{SCHEMAS}")
    # the schemas are the client's text: never special tokens, whatever they contain
    return _template(head) + [("\n".join(_json(t) for t in tools), False)] + _template(tail)


def call_arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    """A call's arguments as an object (OpenAI sends JSON text; text that is not an object becomes one argument
    named "arguments", as the model's encoder does)."""
    args = call.get("function", call).get("arguments", {})
    if isinstance(args, Mapping):
        return dict(args)
    try:
        parsed = json.loads(args)
    except (TypeError, ValueError):
        parsed = None
    return parsed if isinstance(parsed, dict) else {"arguments": args}


def tool_calls_segments(calls: Sequence[Mapping[str, Any]]) -> list[Segment]:
    d = (DSML, True)
    out: list[Segment] = [("\n\n<", False), d, ("tool_calls>\n", False)]
    for n, call in enumerate(calls):
        fn = call.get("function", call)
        out += ([("\n", False)] if n else []) + [("<", False), d, (f'invoke name="{fn["name"]}">\n', False)]
        for k, (key, value) in enumerate(call_arguments(call).items()):
            is_str = isinstance(value, str)
            out += ([("\n", False)] if k else []) + [
                ("<", False), d, (f'parameter name="{key}" string="{"true" if is_str else "false"}">'
                                  f'{value if is_str else _json(value)}</', False), d, ("parameter>", False)]
        out += [("\n</", False), d, ("invoke>", False)]
    return out + [("\n</", False), d, ("tool_calls>", False)]


def _turns(messages: Sequence[Message]) -> list[tuple[str, Any]]:
    """("user", [parts]) for each run of user messages and tool results (the results of one assistant turn sorted
    into the order of its calls), ("assistant", Message) for each assistant message."""
    turns: list[tuple[str, Any]] = []
    order: dict[str, int] = {}
    for m in messages:
        if m.role == "assistant":
            turns.append(("assistant", m))
            if m.tool_calls:  # an answer without calls leaves the last calls' order in force
                order = {c["id"]: n for n, c in enumerate(m.tool_calls) if isinstance(c.get("id"), str)}
            continue
        if not turns or turns[-1][0] != "user":
            turns.append(("user", []))
        part = f"<tool_result>{m.content}</tool_result>" if m.role == "tool" else m.content
        turns[-1][1].append((m.role == "tool", order.get(m.tool_call_id or "", 0), part))
    out: list[tuple[str, Any]] = []
    for kind, v in turns:
        if kind == "user":  # results move among the results' places only, stably by call order
            results = iter(sorted((p for p in v if p[0]), key=lambda p: p[1]))
            v = [next(results)[2] if is_result else part for is_result, _, part in v]
        out.append((kind, v))
    return out


def render_segments(messages: Iterable[Message], thinking: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None, max_effort: bool = False) -> list[Segment]:
    """The prompt as spans: special tokens (is_special=True) and the texts between them. `tools`: function
    definitions (tool_schemas); `max_effort`: the Think-Max prefix (thinking mode only)."""
    messages = list(messages)
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    out: list[Segment] = [(BOS, True)]

    def text(t: str) -> None:
        if t:
            out.append((t, False))

    if thinking and max_effort:
        text(MAX_EFFORT_PREFIX)
    text(system)
    if tools:
        out += [("\n\n", False)] + tools_block(tools)
    turns = _turns([m for m in messages if m.role != "system"])
    last_user = max((i for i, (kind, _) in enumerate(turns) if kind == "user"), default=-1)
    keep_all = thinking and bool(tools)  # with tools every turn's reasoning stays in the prompt
    for i, (kind, v) in enumerate(turns):
        if kind == "user":
            out.append((USER, True))
            text("\n\n".join(v))
            continue
        out.append((ASSISTANT, True))
        if thinking and (keep_all or (i > last_user and v.reasoning is not None)):
            out.append((THINK, True))
            text(v.reasoning or "")
        out.append((END_THINK, True))
        text(v.content)
        if v.tool_calls:
            out += tool_calls_segments(v.tool_calls)
        out.append((EOS, True))
    out.append((ASSISTANT, True))
    out.append((THINK if thinking else END_THINK, True))
    return out


def render(messages: Iterable[Message], thinking: bool = True, tools: Sequence[dict[str, Any]] | None = None,
           max_effort: bool = False) -> str:
    """The prompt text for the next assistant turn."""
    return "".join(t for t, _ in render_segments(messages, thinking, tools, max_effort))


def encode(tokenizer, messages: Iterable[Message], thinking: bool = True,
           tools: Sequence[dict[str, Any]] | None = None, max_effort: bool = False) -> list[int]:
    """Prompt token ids as ds4 builds them: special tokens inserted by id, each text span encoded on its own with
    special-token strings inside it treated as plain text (a user cannot forge a turn marker). For ordinary text
    this equals tokenizer.encode(render(...))."""
    ids: list[int] = []
    pending = ""  # adjacent text spans are one text, as the tokenizer would see it between two specials
    for t, special in render_segments(messages, thinking, tools, max_effort) + [("", True)]:
        if not special:
            pending += t
            continue
        if pending:
            ids.extend(tokenizer.encode(pending, special=False))
            pending = ""
        if t:
            tid = tokenizer.token_id(t)
            if tid is None:
                raise ChatFormatError(f"the model's vocabulary has no {t!r} token")
            ids.append(tid)
    return ids


def render_user(prompt: str, thinking: bool = False, system: str | None = None) -> str:
    """One user message (the official vectors' rendering when thinking is off and there is no system text)."""
    msgs = ([Message("system", system)] if system else []) + [Message("user", prompt)]
    return render(msgs, thinking=thinking)
