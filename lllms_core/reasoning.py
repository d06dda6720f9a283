"""Thinking separated from the answer, for models that reason in ``<think>…</think>``
(Qwen3, DeepSeek-R1 and their descendants).

The core splits every chat completion's text stream of such a model into ``reasoning``
and ``text`` (:class:`ReasoningSeparator`), so each API shows the thinking in its own
way (``reasoning_content``, thinking blocks, reasoning items) and engines only generate.
Whether a model thinks, and whether its prompt already opens the block (DeepSeek-R1's
template ends the generation prompt with ``<think>``), is read from its chat template
(:func:`think_syntax`). Engines that bound the thinking (a request's ``thinking_budget``)
count it with :class:`ThinkingBudget` and write the closing tag when it runs out.
"""

from __future__ import annotations

from typing import Any

import msgspec

from lllms_core.chat.markers import partial_marker_length
from lllms_core.schemas import CompletionChunk

OPEN = "<think>"
CLOSE = "</think>"


class ThinkSyntax(msgspec.Struct, frozen=True, kw_only=True):
    """How a model's answers mark their thinking."""

    opened_by_prompt: bool = False
    """The template's generation prompt opens the block: the answer starts inside it."""
    open: str = OPEN
    close: str = CLOSE


def think_syntax(template: str | None) -> ThinkSyntax | None:
    """The thinking syntax of a model with this chat template; None for a model that does not think."""
    if not template or OPEN not in template:
        return None
    # the generation prompt is what the template writes after its last `add_generation_prompt` test
    at = template.rfind("add_generation_prompt")
    tail = template[at:] if at != -1 else ""
    opened = tail.find(OPEN)
    return ThinkSyntax(opened_by_prompt=opened != -1 and CLOSE not in tail[opened:])


class ReasoningSplitter:
    """Splits one choice's text, as it streams, into reasoning and answer."""

    def __init__(self, syntax: ThinkSyntax):
        self.syntax = syntax
        self.state = "thinking" if syntax.opened_by_prompt else "start"
        self.pending = ""
        self.thought = False
        """Whether any thinking text went out yet."""

    def push(self, text: str) -> tuple[str, str]:
        """The reasoning and the answer text that ``text`` completes (a marker cut between
        two pieces is held back until it is whole)."""
        self.pending += text
        reasoning, answer = [], []
        while self.pending:
            if self.state == "start":
                stripped = self.pending.lstrip()
                if stripped.startswith(self.syntax.open):
                    self.pending, self.state = stripped[len(self.syntax.open) :], "thinking"
                elif not stripped or self.syntax.open.startswith(stripped):
                    break  # only whitespace, or maybe the opening tag: wait for more
                else:
                    self.state = "answer"
            elif self.state == "thinking":
                if not self.thought:  # the whitespace after the opening tag
                    self.pending = self.pending.lstrip()
                at = self.pending.find(self.syntax.close)
                if at == -1:
                    # hold a partial close tag, and whitespace that may turn out to end the thinking
                    keep = max(partial_marker_length(self.pending, (self.syntax.close,)), len(self.pending) - len(self.pending.rstrip()))
                    reasoning.append(self.pending[: len(self.pending) - keep])
                    self.thought = self.thought or bool(reasoning[-1])
                    self.pending = self.pending[len(self.pending) - keep :]
                    break
                reasoning.append(self.pending[:at].rstrip())
                self.pending, self.state = self.pending[at + len(self.syntax.close) :], "after"
            elif self.state == "after":  # the whitespace between the thinking and the answer
                self.pending = self.pending.lstrip()
                if self.pending:
                    self.state = "answer"
            else:
                answer.append(self.pending)
                self.pending = ""
        return "".join(reasoning), "".join(answer)

    def flush(self) -> tuple[str, str]:
        """What is held back when generation ends."""
        rest, self.pending = self.pending, ""
        if self.state == "thinking":
            return rest.rstrip() if self.thought else rest.strip(), ""
        return "", rest.strip() if self.state in ("start", "after") else rest


class ReasoningSeparator:
    """The chunks of a completion, with each choice's thinking moved into ``reasoning``."""

    def __init__(self, syntax: ThinkSyntax, choices: int):
        self.splitters = [ReasoningSplitter(syntax) for _ in range(choices)]

    def split(self, chunk: CompletionChunk) -> CompletionChunk:
        if not chunk.text:
            return chunk
        reasoning, text = self.splitters[chunk.index].push(chunk.text)
        return msgspec.structs.replace(chunk, text=text, reasoning=chunk.reasoning + reasoning)

    def flush(self) -> list[CompletionChunk]:
        chunks = []
        for index, splitter in enumerate(self.splitters):
            reasoning, text = splitter.flush()
            if reasoning or text:
                chunks.append(CompletionChunk(index=index, text=text, reasoning=reasoning))
        return chunks


class ThinkingBudget:
    """Counts one choice's thinking tokens for an engine that bounds them.

    Before generating each token the engine asks :attr:`exhausted`; when it is true the
    engine writes :attr:`closing` (the close tag and a blank line) instead of sampling,
    then calls :meth:`closed`. After each generated token it calls :meth:`advance` with the
    token's text."""

    def __init__(self, syntax: ThinkSyntax, budget: int):
        self.syntax = syntax
        self.budget = budget
        self.state = "thinking" if syntax.opened_by_prompt else "start"
        self.used = 0
        self.text = ""
        self.closing = syntax.close + "\n\n"

    @classmethod
    def for_request(cls, chat_template: str | None, request: Any) -> "ThinkingBudget | None":
        """The budget of one choice of ``request`` (its ``thinking_budget``) on a model with
        this chat template; None when the request sets none or the model does not think."""
        budget = getattr(request, "thinking_budget", None)
        syntax = think_syntax(chat_template) if budget is not None else None
        return cls(syntax, budget) if syntax is not None else None

    @property
    def exhausted(self) -> bool:
        return self.state == "thinking" and self.used >= self.budget

    def closed(self) -> None:
        self.state = "done"

    def advance(self, piece: str) -> None:
        if self.state == "done":
            return
        self.text += piece
        if self.state == "start":
            stripped = self.text.lstrip()
            if stripped.startswith(self.syntax.open):
                self.state, self.text = "thinking", stripped[len(self.syntax.open) :]
            elif stripped and not self.syntax.open.startswith(stripped):
                self.state = "done"  # the answer does not think
            return
        self.used += 1
        if self.syntax.close in self.text:
            self.state = "done"
        else:
            self.text = self.text[-len(self.syntax.close) :]
