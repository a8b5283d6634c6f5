"""The DS4 chat format (ds4-model-facts.md §E): messages in, one prompt string out.

    BOS + system text (joined by "\\n\\n", no marker)
      + for each turn:  <｜User｜>{user}            (tool results: <｜User｜><tool_result>…</tool_result>, consecutive
                                                    results share one <｜User｜>)
                        <｜Assistant｜></think>{content}<｜end▁of▁sentence｜>       (finished assistant turn)
                        <｜Assistant｜><think>{reasoning}</think>{content}<｜end…｜> (same, after the last user turn
                                                    in thinking mode: its reasoning is kept)
      + <｜Assistant｜><think>     (thinking)   or   <｜Assistant｜></think>   (non-thinking)

`render` gives the text (special tokens as their strings, for the tokenizer to find by string); `encode` gives the
ids the way ds4 does: specials inserted by id, the texts between them encoded as plain text. Tool calls: the structure
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


Segment = tuple[str, bool]  # (text, is_special_token)


def render_segments(messages: Iterable[Message], thinking: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None) -> list[Segment]:
    """The prompt as spans: special tokens (is_special=True) and the texts between them."""
    messages = list(messages)
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    out: list[Segment] = [(BOS, True)]

    def text(t: str) -> None:
        if t:
            out.append((t, False))

    text((_render_tools(tools) if tools else "") + system)
    turns = [m for m in messages if m.role != "system"]
    last_user = max((i for i, m in enumerate(turns) if m.role == "user"), default=-1)
    prev = None
    for i, m in enumerate(turns):
        if m.role == "user":
            out.append((USER, True))
            text(m.content)
        elif m.role == "tool":
            if prev != "tool":
                out.append((USER, True))
            text(f"<tool_result>{m.content}</tool_result>")
        else:  # a finished assistant turn
            out.append((ASSISTANT, True))
            if thinking and i > last_user and m.reasoning is not None:
                out.append((THINK, True))
                text(m.reasoning)
            out.append((END_THINK, True))
            text(m.content)
            if m.tool_calls:
                text(_render_tool_calls(m.tool_calls))
            out.append((EOS, True))
        prev = m.role
    out.append((ASSISTANT, True))
    out.append((THINK if thinking else END_THINK, True))
    return out


def render(messages: Iterable[Message], thinking: bool = True, tools: Sequence[dict[str, Any]] | None = None) -> str:
    """The prompt text for the next assistant turn."""
    return "".join(t for t, _ in render_segments(messages, thinking, tools))


def encode(tokenizer, messages: Iterable[Message], thinking: bool = True,
           tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
    """Prompt token ids as ds4 builds them: special tokens inserted by id, each text span encoded on its own with
    special-token strings inside it treated as plain text (a user cannot forge a turn marker). For ordinary text
    this equals tokenizer.encode(render(...))."""
    ids: list[int] = []
    for t, special in render_segments(messages, thinking, tools):
        if special:
            tid = tokenizer.token_id(t)
            if tid is None:
                raise ChatFormatError(f"the model's vocabulary has no {t!r} token")
            ids.append(tid)
        else:
            ids.extend(tokenizer.encode(t, special=False))
    return ids


def render_user(prompt: str, thinking: bool = False, system: str | None = None) -> str:
    """One user message (the official vectors' rendering when thinking is off and there is no system text)."""
    msgs = ([Message("system", system)] if system else []) + [Message("user", prompt)]
    return render(msgs, thinking=thinking)
