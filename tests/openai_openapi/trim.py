"""Cut OpenAI's API description down to the schemas the tests validate against.

    python tests/openai_openapi/trim.py path/to/full/openapi.json > tests/openai_openapi/openapi.json

Keeps ``openapi``, ``info`` (with its licence) and, verbatim, the ``components/schemas``
named in ``ROOTS`` and every schema they reference. A test that validates against another
component adds it to ``ROOTS`` and runs this again on the full document.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterator

ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
    "CreateTranscriptionResponseJson",
    "CreateTranscriptionResponseVerboseJson",
    "CreateTranscriptionResponseStreamEvent",
    "CreateTranslationResponseJson",
    "CreateTranslationResponseVerboseJson",
    "CreateSpeechResponseStreamEvent",
    "ErrorResponse",
    "ImagesResponse",
    "ListModelsResponse",
    "Model",
    "Response",
    "ResponseItemList",
    "ResponseStreamEvent",
)
PREFIX = "#/components/schemas/"


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for value in node:
            yield from references(value)


def trim(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document["components"]["schemas"]
    kept: set[str] = set()
    pending = list(ROOTS)
    while pending:
        name = pending.pop()
        if name in kept:
            continue
        kept.add(name)
        for reference in references(schemas[name]):
            if not reference.startswith(PREFIX):
                raise ValueError(f"{name} refers outside the schemas: {reference}")
            pending.append(reference.removeprefix(PREFIX))
    return {
        "openapi": document["openapi"],
        "info": document["info"],
        "components": {"schemas": {name: schemas[name] for name in sorted(kept)}},
    }


if __name__ == "__main__":
    with open(sys.argv[1]) as source:
        json.dump(trim(json.load(source)), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")
