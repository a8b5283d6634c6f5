"""Tool calls in the model's output: the DSML block (chat.py's docstring has its format) found in the streamed
answer text, held back from the text the client sees, and parsed into calls.

    scanner = ToolCallScanner()
    shown = scanner.push(text)    # for each piece of answer text; never any part of the block
    scanner.closed                # the block's end tag has arrived: generation can stop
    shown, calls = scanner.finish()
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from .tokenizer import DSML

START = f"<{DSML}tool_calls>"
END = f"</{DSML}tool_calls>"
_INVOKE = re.compile(rf'<{DSML}invoke name="([^"]*)">(.*?)</{DSML}invoke>', re.S)
_PARAM = re.compile(rf'<{DSML}parameter name="([^"]*)"(?: string="(true|false)")?>(.*?)</{DSML}parameter>', re.S)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def parse_block(block: str) -> list[ToolCall]:
    """The complete invokes of a block's text (an unfinished last one is dropped). string="false" values are JSON;
    one that does not parse is kept as its text, as is a value whose string attribute is missing and is not JSON."""
    calls = []
    for name, body in _INVOKE.findall(block):
        args: dict[str, Any] = {}
        for key, is_str, value in _PARAM.findall(body):
            if is_str == "true":
                args[key] = value
            else:
                try:
                    args[key] = json.loads(value)
                except ValueError:
                    args[key] = value
        calls.append(ToolCall(name, args))
    return calls


class ToolCallScanner:
    """Answer text in, the part to show out. Text that may be the start of the block (a prefix of its start tag,
    or the blank lines before it) waits until it is decided; from the start tag on, nothing is shown."""

    def __init__(self) -> None:
        self._held = ""
        self._block: str | None = None
        self.closed = False

    def push(self, text: str) -> str:
        if self._block is not None:
            self._block += text
            self.closed = END in self._block
            return ""
        buf = self._held + text
        at = buf.find(START)
        if at >= 0:
            self._block = buf[at:]
            self.closed = END in self._block
            self._held = ""
            return buf[:at].rstrip("\n")
        keep = next((n for n in range(min(len(START) - 1, len(buf)), 0, -1) if buf.endswith(START[:n])), 0)
        shown, self._held = buf[: len(buf) - keep], buf[len(buf) - keep:]
        tail = len(shown) - len(shown.rstrip("\n"))  # blank lines wait: the block comes after "\n\n"
        if tail:
            shown, self._held = shown[:-tail], shown[-tail:] + self._held
        return shown

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(text still to show, the calls). Without a block the held text is shown after all."""
        if self._block is None:
            held, self._held = self._held, ""
            return held, []
        return "", parse_block(self._block)
