"""Two more client surfaces over the same engine, chat format and worker as /v1/chat/completions (platform-facts
§6: ds4 serves both): Anthropic's Messages API (`POST /v1/messages`) and OpenAI's Responses API
(`POST /v1/responses`). Text and function tools, like the chat endpoint: images, files and built-in tools are
refused with a 400 that says so, and nothing is stored between requests (no `previous_response_id`).

Each surface is a request parser (body -> chat messages, the OpenAI-named sampling fields that server.sampling_from
reads, the tools) and a builder that turns the worker's events ("delta", kind, text) / ("tool_calls", [ToolCall])
/ ("done", finish, result) / ("error", status, message) into that API's response object or its stream of named SSE
events.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Mapping

from . import chat
from .sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from .toolcalls import ToolCall

Event = tuple  # a worker event, see the module docstring


class RequestError(Exception):
    """A request this surface cannot serve; the server answers 400 with `param` (chat.ChatFormatError, from the
    shared content and tool parsing, too)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


@dataclass
class Answer:
    """A finished non-streamed job: what collect() gathers from the worker's events."""
    reasoning: str
    content: str
    finish: str  # stop | length | tool_calls | cancelled
    result: dict[str, Any] | None  # usage, timings, stop_sequence, ...; None: the client went away
    calls: list[ToolCall] = field(default_factory=list)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def openai_call(c: ToolCall) -> dict[str, Any]:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}


def _call(call_id: Any, name: Any, arguments: Any, where: str) -> dict[str, Any]:
    """A call of an earlier turn in chat.Message's (OpenAI's) shape."""
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where} needs a tool name", where)
    return {"id": call_id if isinstance(call_id, str) else "", "type": "function",
            "function": {"name": name, "arguments": arguments if arguments is not None else {}}}


# ---- Anthropic Messages API -------------------------------------------------------------------------------------
def _anthropic_tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """Custom tools as function definitions; None when there are none or tool_choice is {"type": "none"}."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or (isinstance(choice, Mapping) and choice.get("type") == "none"):
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be an array", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, Mapping) or t.get("type", "custom") != "custom" or not isinstance(t.get("name"), str):
            kind = t.get("type") if isinstance(t, Mapping) else type(t).__name__
            raise RequestError(f"tools[{i}] of type {kind!r} is not supported (custom tools with a name and an "
                               f"input_schema only)", "tools")
        fn: dict[str, Any] = {"name": t["name"]}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        fn["parameters"] = t.get("input_schema", {})
        out.append(fn)
    return out


def _anthropic_turn(role: str, content: Any, where: str) -> list[chat.Message]:
    """One Anthropic message as chat messages: a user message's tool_result blocks become tool results (before
    its text), an assistant message's tool_use blocks its calls, thinking blocks its reasoning."""
    if isinstance(content, str):
        return [chat.Message(role, content)]
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or an array of content blocks", where)
    text, thinking, calls, results = [], [], [], []
    for j, b in enumerate(content):
        kind = b.get("type") if isinstance(b, Mapping) else None
        if kind == "text" and isinstance(b.get("text"), str):
            text.append(b["text"])
        elif kind == "thinking" and role == "assistant" and isinstance(b.get("thinking"), str):
            thinking.append(b["thinking"])
        elif kind == "redacted_thinking" and role == "assistant":
            continue
        elif kind == "tool_use" and role == "assistant":
            calls.append(_call(b.get("id"), b.get("name"), b.get("input"), f"{where}.content[{j}]"))
        elif kind == "tool_result" and role == "user":
            body = b.get("content", "")
            body = chat.content_text(body, f"{where}.content[{j}].content") if body is not None else ""
            results.append(chat.Message("tool", body, tool_call_id=b.get("tool_use_id")))
        else:
            raise RequestError(f"{where}.content[{j}] of type {kind!r} is not supported in a {role} message "
                               f"(text, thinking, tool_use and tool_result only: no images or files)", where)
    if role == "assistant":
        return [chat.Message("assistant", "".join(text), "".join(thinking) or None, calls)]
    return results + ([chat.Message("user", "".join(text))] if text or not results else [])


def anthropic_request(body: Mapping[str, Any]) -> tuple[list[chat.Message], dict[str, Any], list | None]:
    """Messages, the sampling fields under their OpenAI names (max_tokens, stop, temperature, top_p, top_k), and the
    tools as function definitions (None: no tools)."""
    if "max_tokens" not in body:
        raise RequestError("'max_tokens' is required", "max_tokens")
    tools = _anthropic_tools(body)
    msgs: list[chat.Message] = []
    system = body.get("system")
    if system is not None:
        text = chat.content_text(system, "system")
        if text:
            msgs.append(chat.Message("system", text))
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty array", "messages")
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping) or m.get("role") not in ("user", "assistant"):
            raise RequestError(f"{where}.role must be 'user' or 'assistant' (system text goes in 'system')", where)
        msgs += _anthropic_turn(m["role"], m.get("content"), where)
    if msgs[-1].role == "assistant":
        raise RequestError("a final assistant message (prefilling the answer) is not supported", "messages")
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise RequestError("'stop_sequences' must be an array of strings", "stop_sequences")
    fields = {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k") if k in body}
    fields["stop"] = stops or []
    return msgs, fields, tools


_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "cancelled": "end_turn", "tool_calls": "tool_use"}


def _anthropic_stop(finish: str, result: Mapping[str, Any]) -> tuple[str, str | None]:
    if result.get("stop_sequence") is not None:
        return "stop_sequence", result["stop_sequence"]
    if finish == "length" and result.get("context_full"):
        return "model_context_window_exceeded", None
    return _ANTHROPIC_STOP.get(finish, "end_turn"), None


def _tool_use(c: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": c.id.replace("call_", "toolu_", 1), "name": c.name, "input": c.arguments}


def anthropic_message(model: str, msg_id: str, a: Answer, thinking: bool) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = []
    if thinking and a.reasoning:
        blocks.append({"type": "thinking", "thinking": a.reasoning, "signature": ""})
    if a.content or not (blocks or a.calls):
        blocks.append({"type": "text", "text": a.content})
    blocks += [_tool_use(c) for c in a.calls]
    stop_reason, stop_sequence = _anthropic_stop(a.finish, a.result or {})
    usage = a.result["usage"]
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                      "cache_read_input_tokens": a.result["timings"]["reused_tokens"]}}


async def anthropic_events(model: str, msg_id: str, n_prompt: int,
                           events: AsyncIterator[Event]) -> AsyncIterator[dict[str, str]]:
    """SSE events of a streamed message: message_start, then per block content_block_start / _delta / _stop
    (thinking, text, tool_use), message_delta with the stop reason and usage, message_stop."""
    def ev(name: str, data: dict[str, Any]) -> dict[str, str]:
        return {"event": name, "data": json.dumps({"type": name, **data}, ensure_ascii=False)}

    yield ev("message_start", {"message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": n_prompt, "output_tokens": 0}}})
    index, open_kind = -1, None

    def start(kind: str, block: dict[str, Any] | None = None) -> Iterator[dict[str, str]]:
        nonlocal index, open_kind
        if open_kind is not None:
            yield ev("content_block_stop", {"index": index})
        index, open_kind = index + 1, kind
        if block is None:
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
        elif e[0] == "tool_calls":
            for c in e[1]:
                for x in start("tool", {**_tool_use(c), "input": {}}):
                    yield x
                yield ev("content_block_delta", {"index": index, "delta": {"type": "input_json_delta",
                                                                           "partial_json": c.arguments_json}})
        elif e[0] == "error":
            yield ev("error", {"error": {"type": "api_error", "message": e[2]}})
            return
        elif e[0] == "done":
            finish, result = e[1], e[2]
            if open_kind is None or (open_kind == "reasoning" and finish not in ("length", "tool_calls")):
                for x in start("content"):  # an answer ends with a text block (it may be empty) or its calls
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
_RESPONSE_TEXT = ("input_text", "output_text", "text")  # the Responses API's text part types


def responses_request(body: Mapping[str, Any]) -> tuple[list[chat.Message], dict[str, Any], Any]:
    """Messages, the sampling fields under their chat names, and `reasoning.effort` (None: not given). The tools
    go to chat.tool_schemas as they are."""
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
        if kind == "function_call":  # a call of an earlier turn: it belongs to that turn's assistant message
            call = _call(item.get("call_id"), item.get("name"), item.get("arguments"), where)
            if not msgs or msgs[-1].role != "assistant":
                msgs.append(chat.Message("assistant", ""))
            msgs[-1].tool_calls.append(call)
            continue
        if kind == "function_call_output":
            out = item.get("output", "")
            out = chat.content_text(out, f"{where}.output", _RESPONSE_TEXT)
            msgs.append(chat.Message("tool", out, tool_call_id=item.get("call_id")))
            continue
        if kind != "message":
            raise RequestError(f"{where} of type {kind!r} is not supported (messages, function calls and their "
                               f"outputs only)", where)
        role = item.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"{where}.role must be one of user, assistant, system, developer", where)
        text = chat.content_text(item.get("content"), f"{where}.content", _RESPONSE_TEXT)
        msgs.append(chat.Message(role, text))
    if not any(m.role in ("user", "tool") for m in msgs):
        raise RequestError("'input' has no user message", "input")
    fields = {k: body[k] for k in ("temperature", "top_p") if k in body}
    n = body.get("max_output_tokens")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RequestError("'max_output_tokens' must be an integer >= 1", "max_output_tokens")
        fields["max_tokens"] = n
    reasoning = body.get("reasoning")
    return msgs, fields, reasoning.get("effort") if isinstance(reasoning, Mapping) else None


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
                "tool_choice": b.get("tool_choice", "auto"), "tools": b.get("tools") or [],
                "truncation": "disabled", "usage": self.usage, "metadata": b.get("metadata") or {}}

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

    @staticmethod
    def call_item(c: ToolCall, arguments: str, status: str) -> dict[str, Any]:
        return {"type": "function_call", "id": c.id.replace("call_", "fc_", 1), "call_id": c.id, "name": c.name,
                "arguments": arguments, "status": status}

    def response(self, a: Answer) -> dict[str, Any]:
        """The whole Response of a non-streamed request."""
        if self.thinking and a.reasoning:
            self.output.append(self.reasoning_item(new_id("rs"), a.reasoning, "completed"))
        if a.content or not (self.output or a.calls):
            self.output.append(self.message_item(new_id("msg"), a.content,
                                                 "incomplete" if a.finish == "length" else "completed"))
        self.output += [self.call_item(c, c.arguments_json, "completed") for c in a.calls]
        self.finish(a.finish, a.result)
        return self.snapshot()

    async def events(self, events: AsyncIterator[Event]) -> AsyncIterator[dict[str, str]]:
        """SSE events of a streamed request: response.created / .in_progress; per output item .output_item.added,
        its deltas and .done events, .output_item.done; then response.completed (or .incomplete)."""
        def ev(name: str, data: dict[str, Any]) -> dict[str, str]:
            out = {"event": name, "data": json.dumps({"type": name, "sequence_number": self.seq, **data},
                                                      ensure_ascii=False)}
            self.seq += 1
            return out

        yield ev("response.created", {"response": self.snapshot()})
        yield ev("response.in_progress", {"response": self.snapshot()})
        cur: dict[str, Any] | None = None  # the open text item: {"kind", "id", "index", "text"}

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

        def calls(found: list[ToolCall]) -> Iterator[dict[str, str]]:
            yield from close("completed")
            for c in found:
                index, item = len(self.output), self.call_item(c, "", "in_progress")
                self.output.append(item)
                loc = {"item_id": item["id"], "output_index": index}
                yield ev("response.output_item.added", {"output_index": index, "item": item})
                yield ev("response.function_call_arguments.delta", {**loc, "delta": c.arguments_json})
                yield ev("response.function_call_arguments.done", {**loc, "arguments": c.arguments_json,
                                                                   "name": c.name})
                self.output[index] = self.call_item(c, c.arguments_json, "completed")
                yield ev("response.output_item.done", {"output_index": index, "item": self.output[index]})

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
            elif e[0] == "tool_calls":
                for x in calls(e[1]):
                    yield x
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
