"""A prompt longer than the context: one policy per model (``context_overflow``), the
same in every engine; the engine only counts tokens.

- ``drop_oldest`` (default): a prompt must leave room for the answer,
  ``min(max_tokens or context/4, context/2)`` tokens. A chat that does not loses its
  oldest turns: the kept history starts at a user message, and every system (and
  developer) message and the last message are always kept. If even they leave less
  room, they are kept as long as they fit the context with one token to spare (the
  answer then ends with ``length`` at the context's end); else the request is refused.
  A text prompt keeps its first token (BOS) and as many of its last tokens as fit.
- ``error``: a prompt that does not fit the context together with ``max_tokens`` (or
  one token) is refused.

Refusals are 400 ``context_length_exceeded``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal, Sequence, TypeVar

from lllms_core.errors import ContextLengthExceededError
from lllms_core.schemas import ChatMessage, DeveloperMessage, SystemMessage, UserMessage

if TYPE_CHECKING:
    from lllms_core.chat.templates import ChatTemplate, RenderedPrompt
    from lllms_core.chat.tools import ToolSetup

ContextOverflow = Literal["drop_oldest", "error"]
T = TypeVar("T")


class PromptTooLong(Exception):
    """An engine's answer to :func:`fit_messages`: the prompt has more tokens than allowed
    (``count`` of them; ``at_least``: or more, for an engine that stopped counting)."""

    def __init__(self, count: int, at_least: bool = False):
        super().__init__(count)
        self.count = count
        self.at_least = at_least


class ContextBudget:
    """How many prompt tokens a request may use in a context of ``context_size`` tokens."""

    def __init__(self, context_size: int, token_limit: int | None, policy: ContextOverflow = "drop_oldest"):
        self.context_size = context_size
        self.token_limit = token_limit
        self.policy = policy
        if policy == "error":
            self.limit = context_size - (token_limit or 1)
        else:
            self.limit = context_size - min(token_limit or context_size // 4, context_size // 2)

    def check(self, count: int, limit: int | None = None, at_least: bool = False) -> None:
        """Raise :class:`PromptTooLong` when ``count`` prompt tokens (``at_least``: or more)
        are more than allowed."""
        if count > (self.limit if limit is None else limit):
            raise PromptTooLong(count, at_least)

    def refused(self, too_long: PromptTooLong, param: str) -> ContextLengthExceededError:
        count = f"{'at least ' if too_long.at_least else ''}{too_long.count}"
        if self.policy == "error":
            detail = f" and {self.token_limit} for the completion" if self.token_limit else ""
            message = f"this model's context holds {self.context_size} tokens; the request needs {count} for the prompt{detail}"
        else:
            message = f"the prompt has {count} tokens after dropping old turns; this model's context holds {self.context_size}"
        return ContextLengthExceededError(message, param=param)


def _is_system(message: ChatMessage) -> bool:
    return isinstance(message, (SystemMessage, DeveloperMessage))


def fit_messages(
    messages: Sequence[ChatMessage], attempt: Callable[[list[ChatMessage], int], T], budget: ContextBudget
) -> T:
    """Apply the policy to a conversation. ``attempt(messages, limit)`` renders and counts
    the messages it gets and returns the prompt, or raises :class:`PromptTooLong` when it
    has more than ``limit`` tokens. Old turns are found by bisection (a conversation may
    have hundreds), and no conversation is counted twice when its count already tells."""
    messages = list(messages)
    failures: dict[int, PromptTooLong] = {}

    def trial(start: int, limit: int) -> T:
        known = failures.get(start)
        if known is not None and known.count > limit:
            raise known
        kept = [message for message in messages[:start] if _is_system(message)] + messages[start:]
        try:
            return attempt(kept, limit)
        except PromptTooLong as too_long:
            failures[start] = too_long
            raise

    first = next((index for index, message in enumerate(messages) if not _is_system(message)), len(messages) - 1)
    try:
        return trial(first, budget.limit)
    except PromptTooLong as too_long:
        if budget.policy == "error":
            raise budget.refused(too_long, "messages") from None
    last = len(messages) - 1
    starts = [index for index in range(first + 1, last) if isinstance(messages[index], UserMessage)]
    if last > first:
        starts.append(last)
    low, high = 0, len(starts) - 1
    best = None
    while low <= high:
        middle = (low + high) // 2
        try:
            best = trial(starts[middle], budget.limit)
            high = middle - 1
        except PromptTooLong:
            low = middle + 1
    if best is not None:
        return best
    try:  # the system messages and the last message, with less room for the answer
        return trial(starts[-1] if starts else first, budget.context_size - 1)
    except PromptTooLong as too_long:
        raise budget.refused(too_long, "messages") from None


def fit_chat(
    messages: Sequence[ChatMessage],
    template: "ChatTemplate",
    tools: "ToolSetup | None",
    budget: ContextBudget,
    tokenize: Callable[["RenderedPrompt", list[ChatMessage]], list[int]],
    longest_token: int,
    image_marker: str | None = None,
) -> tuple["RenderedPrompt", list[int]]:
    """:func:`fit_messages` for an engine with a tokenizer: the conversation rendered by
    ``template`` and tokenized by ``tokenize(rendered, kept messages)`` (client text as plain
    text; images, if any, are those of the kept messages), after dropping what the policy
    drops. ``longest_token``: the byte length of the vocabulary's longest token, for
    :func:`fewest_tokens`."""

    def attempt(kept: list[ChatMessage], limit: int) -> tuple["RenderedPrompt", list[int]]:
        rendered = template.prompt(kept, tools, image_marker=image_marker)
        budget.check(fewest_tokens(rendered.text, longest_token), limit, at_least=True)
        tokens = tokenize(rendered, kept)
        budget.check(len(tokens), limit)
        return rendered, tokens

    return fit_messages(messages, attempt, budget)


def fewest_tokens(text: str, longest_token: int) -> int:
    """The fewest tokens ``text`` can have, given the byte length of a vocabulary's longest
    token: a text far too long for the context is refused without tokenizing it (tokenizing
    50 MB takes minutes)."""
    return len(text.encode("utf-8", "surrogatepass")) // max(longest_token, 1)


def fit_tokens(tokens: list[int], budget: ContextBudget, keep_first: bool) -> list[int]:
    """Apply the policy to a text prompt's tokens; ``keep_first``: its first token (BOS) stays."""
    if len(tokens) <= budget.limit:
        return tokens
    if budget.policy == "error":
        raise budget.refused(PromptTooLong(len(tokens)), "prompt")
    head = tokens[:1] if keep_first else []
    return head + tokens[len(tokens) - budget.limit + len(head) :]
