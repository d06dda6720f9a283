"""Context identities: chains of hashes that route a request to the slot holding
the longest matching context.

A chat's identity is one hash per message, each chained to the one before, so a
follow-up turn shares a prefix with the slot that answered the turn before. A
text's identity is one chained hash per block of characters. Only hashes are
kept and shown, never text.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import msgspec

from lllms_core.schemas import AssistantMessage, ChatMessage, ImageUrlPart, message_text

ContextKey = tuple[str, ...]
TEXT_BLOCK = 64


def _chain(items: Iterable[bytes]) -> ContextKey:
    key: list[str] = []
    previous = b""
    for item in items:
        digest = hashlib.blake2b(previous + item, digest_size=8).hexdigest()
        key.append(digest)
        previous = digest.encode()
    return tuple(key)


def _message_bytes(message: ChatMessage) -> bytes:
    role = msgspec.structs.asdict(message).get("role") or type(message).__struct_config__.tag
    parts = [str(role), message_text(message)]
    if isinstance(message, AssistantMessage) and message.tool_calls:
        parts += [f"{call.function.name}({call.function.arguments})" for call in message.tool_calls]
    if isinstance(message.content, list):
        # an image by a hash of its URL (a data URL holds the image itself)
        parts += [
            "image:" + hashlib.blake2b(part.image_url.url.encode(), digest_size=8).hexdigest()
            for part in message.content
            if isinstance(part, ImageUrlPart)
        ]
    return "\x1f".join(parts).encode()


def chat_key(messages: Iterable[ChatMessage]) -> ContextKey:
    return _chain(_message_bytes(message) for message in messages)


def text_key(text: str) -> ContextKey:
    blocks = len(text) // TEXT_BLOCK
    return _chain(text[i * TEXT_BLOCK : (i + 1) * TEXT_BLOCK].encode() for i in range(blocks))


def common_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading items two sequences share (context keys, token ids)."""
    length = min(len(a), len(b))
    for position in range(length):
        if a[position] != b[position]:
            return position
    return length
