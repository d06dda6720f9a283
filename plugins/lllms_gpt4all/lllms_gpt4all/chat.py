"""Chat formats: how messages become text for a model.

gpt4all 2.8.2 does not run a GGUF's Jinja chat template. A chat format here is one
template per role, each with ``%1`` where the message's text goes; the format is
recognised from the GGUF's template or named in the model's options. Template text
is evaluated with special tokens, message text without (a user cannot inject them).
Messages become turns by the core's message policy (:mod:`lllms_core.chat.messages`).
"""

from __future__ import annotations

import msgspec

from lllms_core.plugin_api import (
    ChatMessage,
    ToolSetup,
    template_messages,
)

Turn = tuple[str, str]
"""A message as the engine evaluates it: (role, text)."""


class ChatFormat(msgspec.Struct, frozen=True, kw_only=True):
    system: str
    user: str
    assistant: str

    def template(self, role: str) -> str:
        """gpt4all's prompt template that evaluates one message of ``role``."""
        return getattr(self, role) + "%2"

    def reply_template(self) -> str:
        """The template of a user message followed by the start of the assistant's reply."""
        start, _ = self.assistant.split("%1")
        return self.user + start + "%2"

    @property
    def reply_end(self) -> str:
        """What closes the assistant's reply."""
        return self.assistant.split("%1")[1]


CHAT_FORMATS = {
    "chatml": ChatFormat(
        system="<|im_start|>system\n%1<|im_end|>\n",
        user="<|im_start|>user\n%1<|im_end|>\n",
        assistant="<|im_start|>assistant\n%1<|im_end|>\n",
    ),
    "llama3": ChatFormat(
        system="<|start_header_id|>system<|end_header_id|>\n\n%1<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n%1<|eot_id|>",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n%1<|eot_id|>",
    ),
    "phi3": ChatFormat(
        system="<|system|>\n%1<|end|>\n",
        user="<|user|>\n%1<|end|>\n",
        assistant="<|assistant|>\n%1<|end|>\n",
    ),
}

# what a GGUF's Jinja template contains when it is in a format (Zephyr's has <|assistant|> too, with </s>)
TEMPLATE_MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|eot_id|>"),
    "phi3": ("<|assistant|>", "<|end|>"),
}


def detect_chat_format(jinja_template: str | None) -> str | None:
    if not jinja_template:
        return None
    return next(
        (name for name, markers in TEMPLATE_MARKERS.items() if all(marker in jinja_template for marker in markers)),
        None,
    )


def turns(messages: list[ChatMessage], tools: ToolSetup | None, prefill: bool = True) -> tuple[list[Turn], str | None]:
    """The messages as (role, text) turns by the core's message policy (gpt4all runs no
    Jinja template: tools are described in the system turn, past calls written as the
    model writes them, tool results given as user turns), and the assistant prefill."""
    rendered, continued = template_messages(messages, tools=tools, prefill=prefill)
    return [(turn["role"], turn["content"]) for turn in rendered], continued
