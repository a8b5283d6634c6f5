"""The DS4 chat format (ds4-model-facts.md §E): messages in, one prompt string out.

    BOS + system text (joined by "\\n\\n", no marker)
      + for each turn:  <｜User｜>{user}            (tool results: <｜User｜><tool_result>…</tool_result>, consecutive
                                                    results share one <｜User｜>)
                        <｜Assistant｜></think>{content}<｜end▁of▁sentence｜>       (finished assistant turn)
                        <｜Assistant｜><think>{reasoning}</think>{content}<｜end…｜> (same, after the last user turn
                                                    in thinking mode: its reasoning is kept)
      + <｜Assistant｜><think>     (thinking)   or   <｜Assistant｜></think>   (non-thinking)

The special tokens are written as their strings; the tokenizer finds them by string. Tool calls: the structure
(tool messages, tool_calls on assistant turns, tool schemas before the system text) is here, the DSML rendering
of calls and schemas is not yet: such requests are refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ..errors import UserError
from .tokenizer import ASSISTANT, BOS, END_THINK, EOS, THINK, USER

ROLES = ("system", "user", "assistant", "tool")


class ChatFormatError(UserError):
    """A request the chat format cannot render (bad role, unsupported feature)."""


@dataclass
class Message:
    role: str
    content: str = ""
    reasoning: str | None = None  # an assistant turn's thinking text, if the client sent it back
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def content_text(content: Any) -> str:
    """OpenAI content: a string, None, or a list of parts of which we take the text ones."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatFormatError(f"message content part of type {kind!r} is not supported (text only)")
        return "".join(texts)
    raise ChatFormatError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


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
        out.append(Message(role, content_text(m.get("content")), reasoning, list(calls)))
    return out


def _render_tool_calls(calls: Sequence[dict[str, Any]]) -> str:
    # DSML tool-call blocks (<｜DSML｜tool_calls> / invoke / parameter) come with tool support.
    raise ChatFormatError("assistant tool_calls are not supported yet")


def _render_tools(tools: Sequence[dict[str, Any]]) -> str:
    raise ChatFormatError("'tools' are not supported yet")


def render(messages: Iterable[Message], thinking: bool = True, tools: Sequence[dict[str, Any]] | None = None) -> str:
    """The prompt text for the next assistant turn."""
    messages = list(messages)
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    head = BOS + (_render_tools(tools) if tools else "") + system
    turns = [m for m in messages if m.role != "system"]
    last_user = max((i for i, m in enumerate(turns) if m.role == "user"), default=-1)

    parts = [head]
    prev = None
    for i, m in enumerate(turns):
        if m.role == "user":
            parts.append(USER + m.content)
        elif m.role == "tool":
            opener = "" if prev == "tool" else USER
            parts.append(f"{opener}<tool_result>{m.content}</tool_result>")
        else:  # a finished assistant turn
            keep_reasoning = thinking and i > last_user and m.reasoning is not None
            think = f"{THINK}{m.reasoning}{END_THINK}" if keep_reasoning else END_THINK
            calls = _render_tool_calls(m.tool_calls) if m.tool_calls else ""
            parts.append(ASSISTANT + think + m.content + calls + EOS)
        prev = m.role
    parts.append(ASSISTANT + (THINK if thinking else END_THINK))
    return "".join(parts)


def render_user(prompt: str, thinking: bool = False, system: str | None = None) -> str:
    """One user message (the official vectors' rendering when thinking is off and there is no system text)."""
    msgs = ([Message("system", system)] if system else []) + [Message("user", prompt)]
    return render(msgs, thinking=thinking)
