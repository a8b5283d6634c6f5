"""Two more client surfaces over the same engine, chat format and worker as /v1/chat/completions (platform-facts
§6: ds4 serves both): Anthropic's Messages API (`POST /v1/messages`) and OpenAI's Responses API
(`POST /v1/responses`). Text only, like the chat endpoint: tools, images and files are refused with a 400 that says
so, and nothing is stored between requests (no `previous_response_id`).

Each surface is a request parser (body -> chat messages, thinking flag, the OpenAI-named sampling fields that
server.sampling_from reads) and a builder that turns the worker's events ("delta", kind, text) / ("done", finish,
result) / ("error", status, message) into that API's response object or its stream of named SSE events.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Iterator, Mapping

from . import chat
from .sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P

Event = tuple  # a worker event, see the module docstring


class RequestError(Exception):
    """A request this surface cannot serve; the server answers 400 with `param`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _text_parts(content: Any, where: str, text_types: tuple[str, ...], skip: tuple[str, ...] = ()) -> tuple[str, str]:
    """(text, thinking) of a content that is a string or a list of typed blocks."""
    if isinstance(content, str):
        return content, ""
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or an array of content blocks", where)
    text, thinking = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in text_types and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif kind == "thinking" and isinstance(part.get("thinking"), str):
            thinking.append(part["thinking"])
        elif kind in skip:
            continue
        else:
            raise RequestError(f"{where}.content[{j}] of type {kind!r} is not supported: this server takes text only "
                               f"(no tools, images or files)", where)
    return "".join(text), "".join(thinking)


def _no_tools(body: Mapping[str, Any]) -> None:
    if body.get("tools"):
        raise RequestError("'tools' are not supported yet: this server has no tool calling", "tools")


# ---- Anthropic Messages API -------------------------------------------------------------------------------------
def anthropic_request(body: Mapping[str, Any]) -> tuple[list[chat.Message], dict[str, Any]]:
    """Messages + the sampling fields under their OpenAI names (max_tokens, stop, temperature, top_p, top_k)."""
    _no_tools(body)
    if "max_tokens" not in body:
        raise RequestError("'max_tokens' is required", "max_tokens")
    msgs: list[chat.Message] = []
    system = body.get("system")
    if system is not None:
        text, _ = _text_parts(system, "system", ("text",))
        if text:
            msgs.append(chat.Message("system", text))
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty array", "messages")
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping) or m.get("role") not in ("user", "assistant"):
            raise RequestError(f"{where}.role must be 'user' or 'assistant' (system text goes in 'system')", where)
        text, thinking = _text_parts(m.get("content"), where, ("text",), skip=("redacted_thinking",))
        msgs.append(chat.Message(m["role"], text, thinking or None))
    if msgs[-1].role == "assistant":
        raise RequestError("a final assistant message (prefilling the answer) is not supported", "messages")
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise RequestError("'stop_sequences' must be an array of strings", "stop_sequences")
    fields = {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k") if k in body}
    fields["stop"] = stops or []
    return msgs, fields


_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "cancelled": "end_turn"}


def _anthropic_stop(finish: str, result: Mapping[str, Any]) -> tuple[str, str | None]:
    if result.get("stop_sequence") is not None:
        return "stop_sequence", result["stop_sequence"]
    if finish == "length" and result.get("context_full"):
        return "model_context_window_exceeded", None
    return _ANTHROPIC_STOP.get(finish, "end_turn"), None


def anthropic_message(model: str, msg_id: str, reasoning: str, content: str, thinking: bool, finish: str,
                      result: Mapping[str, Any]) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = []
    if thinking and reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if content or not blocks:
        blocks.append({"type": "text", "text": content})
    stop_reason, stop_sequence = _anthropic_stop(finish, result)
    usage = result["usage"]
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                      "cache_read_input_tokens": result["timings"]["reused_tokens"]}}


async def anthropic_events(model: str, msg_id: str, n_prompt: int,
                           events: AsyncIterator[Event]) -> AsyncIterator[dict[str, str]]:
    """SSE events of a streamed message: message_start, then per block content_block_start / _delta / _stop
    (thinking first, then text), message_delta with the stop reason and usage, message_stop."""
    def ev(name: str, data: dict[str, Any]) -> dict[str, str]:
        return {"event": name, "data": json.dumps({"type": name, **data}, ensure_ascii=False)}

    yield ev("message_start", {"message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": n_prompt, "output_tokens": 0}}})
    index, open_kind = -1, None

    def start(kind: str) -> Iterator[dict[str, str]]:
        nonlocal index, open_kind
        if open_kind is not None:
            yield ev("content_block_stop", {"index": index})
        index, open_kind = index + 1, kind
        block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "reasoning" else \
            {"type": "text", "text": ""}
        yield ev("content_block_start", {"index": index, "content_block": block})

    async for e in events:
        if e[0] == "delta":
            kind = "reasoning" if e[1] == "reasoning" else "content"
            if kind != open_kind:
                for x in start(kind):
                    yield x
            delta = {"type": "thinking_delta", "thinking": e[2]} if kind == "reasoning" else \
                {"type": "text_delta", "text": e[2]}
            yield ev("content_block_delta", {"index": index, "delta": delta})
        elif e[0] == "error":
            yield ev("error", {"error": {"type": "api_error", "message": e[2]}})
            return
        elif e[0] == "done":
            finish, result = e[1], e[2]
            if open_kind != "content" and (open_kind is None or finish != "length"):
                for x in start("content"):  # an answer always ends with a text block (it may be empty)
                    yield x
            yield ev("content_block_stop", {"index": index})
            if result is None:  # cancelled before it ran
                result = {"usage": {"completion_tokens": 0}}
            stop_reason, stop_sequence = _anthropic_stop(finish, result)
            yield ev("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                       "usage": {"output_tokens": result["usage"]["completion_tokens"]}})
            yield ev("message_stop", {})
            return


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error", 503: "overloaded_error"}.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


# ---- OpenAI Responses API ---------------------------------------------------------------------------------------
def responses_request(body: Mapping[str, Any]) -> tuple[list[chat.Message], dict[str, Any], bool | None]:
    """Messages, the sampling fields under their chat names, and the thinking choice of `reasoning.effort`
    (None: not given)."""
    _no_tools(body)
    if body.get("previous_response_id") is not None:
        raise RequestError("'previous_response_id' is not supported: this server stores no responses; send the "
                           "whole conversation in 'input'", "previous_response_id")
    fmt = body.get("text", {}).get("format") if isinstance(body.get("text"), Mapping) else None
    if isinstance(fmt, Mapping) and fmt.get("type", "text") != "text":
        raise RequestError(f"text.format {fmt.get('type')!r} is not supported (plain text only)", "text")
    msgs: list[chat.Message] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise RequestError("'instructions' must be a string", "instructions")
        if instructions:
            msgs.append(chat.Message("system", instructions))
    raw = body.get("input")
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise RequestError("'input' must be a string or a non-empty array of items", "input")
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, Mapping) else None
        if kind == "reasoning":  # a previous turn's thinking: not part of the next prompt (chat.py's rule)
            continue
        if kind != "message":
            raise RequestError(f"{where} of type {kind!r} is not supported: this server takes messages only (no "
                               f"tool calls)", where)
        role = item.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"{where}.role must be one of user, assistant, system, developer", where)
        text, _ = _text_parts(item.get("content"), where, ("input_text", "output_text", "text"))
        msgs.append(chat.Message(role, text))
    if not any(m.role == "user" for m in msgs):
        raise RequestError("'input' has no user message", "input")
    fields = {k: body[k] for k in ("temperature", "top_p") if k in body}
    n = body.get("max_output_tokens")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RequestError("'max_output_tokens' must be an integer >= 1", "max_output_tokens")
        fields["max_tokens"] = n
    thinking = None
    reasoning = body.get("reasoning")
    if isinstance(reasoning, Mapping) and reasoning.get("effort") is not None:
        thinking = reasoning["effort"] not in ("none", "minimal")
    return msgs, fields, thinking


class ResponsesBuilder:
    """The Response object of one request, as it grows: its snapshot for response.created / .completed, its
    output items, and the SSE events that describe each step."""

    def __init__(self, model: str, body: Mapping[str, Any], thinking: bool):
        self.id, self.created = new_id("resp"), int(time.time())
        self.model, self.body, self.thinking = model, body, thinking
        self.output: list[dict[str, Any]] = []
        self.status = "in_progress"
        self.incomplete: dict[str, str] | None = None
        self.usage: dict[str, Any] | None = None
        self.seq = 0

    def snapshot(self) -> dict[str, Any]:
        b = self.body
        effort = b["reasoning"].get("effort") if isinstance(b.get("reasoning"), Mapping) else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": self.status,
                "error": None, "incomplete_details": self.incomplete, "instructions": b.get("instructions"),
                "max_output_tokens": b.get("max_output_tokens"), "model": self.model, "output": self.output,
                "parallel_tool_calls": True, "previous_response_id": None,
                "reasoning": {"effort": effort, "summary": None}, "store": False,
                "temperature": b.get("temperature", DEFAULT_TEMPERATURE), "top_p": b.get("top_p", DEFAULT_TOP_P),
                "text": {"format": {"type": "text"}},
                "tool_choice": "auto", "tools": [], "truncation": "disabled", "usage": self.usage,
                "metadata": b.get("metadata") or {}}

    def finish(self, finish: str, result: Mapping[str, Any] | None) -> None:
        if finish == "length":
            self.status = "incomplete"
            self.incomplete = {"reason": "max_output_tokens"}
        else:
            self.status = "completed"
        if result is not None:
            u = result["usage"]
            self.usage = {"input_tokens": u["prompt_tokens"],
                          "input_tokens_details": {"cached_tokens": result["timings"]["reused_tokens"]},
                          "output_tokens": u["completion_tokens"],
                          "output_tokens_details": {"reasoning_tokens": result.get("reasoning_tokens", 0)},
                          "total_tokens": u["total_tokens"]}

    @staticmethod
    def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
        return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": text}] if text else []}

    @staticmethod
    def message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
        parts = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": parts}

    def response(self, reasoning: str, content: str, finish: str, result: Mapping[str, Any]) -> dict[str, Any]:
        """The whole Response of a non-streamed request."""
        if self.thinking and reasoning:
            self.output.append(self.reasoning_item(new_id("rs"), reasoning, "completed"))
        if content or not self.output:
            self.output.append(self.message_item(new_id("msg"), content,
                                                 "incomplete" if finish == "length" else "completed"))
        self.finish(finish, result)
        return self.snapshot()

    async def events(self, events: AsyncIterator[Event]) -> AsyncIterator[dict[str, str]]:
        """SSE events of a streamed request: response.created / .in_progress; per output item .output_item.added,
        its text deltas and .done events, .output_item.done; then response.completed (or .incomplete)."""
        def ev(name: str, data: dict[str, Any]) -> dict[str, str]:
            out = {"event": name, "data": json.dumps({"type": name, "sequence_number": self.seq, **data},
                                                      ensure_ascii=False)}
            self.seq += 1
            return out

        yield ev("response.created", {"response": self.snapshot()})
        yield ev("response.in_progress", {"response": self.snapshot()})
        cur: dict[str, Any] | None = None  # the open item: {"kind", "id", "index", "text"}

        def close(status: str) -> Iterator[dict[str, str]]:
            nonlocal cur
            if cur is None:
                return
            loc = {"item_id": cur["id"], "output_index": cur["index"], "content_index": 0}
            text = "".join(cur["text"])
            if cur["kind"] == "reasoning":
                yield ev("response.reasoning_text.done", {**loc, "text": text})
                item = self.reasoning_item(cur["id"], text, status)
            else:
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                yield ev("response.output_text.done", {**loc, "text": text, "logprobs": []})
                yield ev("response.content_part.done", {**loc, "part": part})
                item = self.message_item(cur["id"], text, status)
            self.output[cur["index"]] = item
            yield ev("response.output_item.done", {"output_index": cur["index"], "item": item})
            cur = None

        def open_item(kind: str) -> Iterator[dict[str, str]]:
            nonlocal cur
            yield from close("completed")
            item_id = new_id("rs" if kind == "reasoning" else "msg")
            cur = {"kind": kind, "id": item_id, "index": len(self.output), "text": []}
            item = self.reasoning_item(item_id, "", "in_progress") if kind == "reasoning" else \
                self.message_item(item_id, None, "in_progress")
            self.output.append(item)
            yield ev("response.output_item.added", {"output_index": cur["index"], "item": item})
            if kind == "content":
                yield ev("response.content_part.added", {
                    "item_id": item_id, "output_index": cur["index"], "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})

        async for e in events:
            if e[0] == "delta":
                kind = "reasoning" if e[1] == "reasoning" else "content"
                if cur is None or cur["kind"] != kind:
                    for x in open_item(kind):
                        yield x
                cur["text"].append(e[2])
                loc = {"item_id": cur["id"], "output_index": cur["index"], "content_index": 0}
                if kind == "reasoning":
                    yield ev("response.reasoning_text.delta", {**loc, "delta": e[2]})
                else:
                    yield ev("response.output_text.delta", {**loc, "delta": e[2], "logprobs": []})
            elif e[0] == "error":
                yield ev("error", {"code": "server_error", "message": e[2], "param": None})
                return
            elif e[0] == "done":
                finish, result = e[1], e[2]
                if not self.output or (cur is not None and cur["kind"] == "reasoning" and finish != "length"):
                    for x in open_item("content"):  # an answer always ends with a message (it may be empty)
                        yield x
                for x in close("incomplete" if finish == "length" else "completed"):
                    yield x
                self.finish(finish, result)
                name = "response.incomplete" if self.status == "incomplete" else "response.completed"
                yield ev(name, {"response": self.snapshot()})
                return

