"""What gpt4all 2.8.2 can load: reading a GGUF's metadata, and a compatible copy of a
model whose pre-tokenizer name is newer than gpt4all's llama.cpp.

gpt4all 2.8.2 bundles a llama.cpp of mid 2024, which refuses a GGUF whose
``tokenizer.ggml.pre`` it does not know (``unknown pre-tokenizer type``). Some newer
names split text exactly like an older one; for those, preparation writes a copy of
the file whose value names the older one, in the cache directory. The original file
is never modified.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import filelock
import msgspec

from lllms_core.plugin_api import ModelLoadError

log = logging.getLogger("lllms.gpt4all")

PRE_TOKENIZER_KEY = "tokenizer.ggml.pre"

KNOWN_PRE_TOKENIZERS = frozenset({
    "default", "llama3", "llama-v3", "llama-bpe", "deepseek-llm", "deepseek-coder", "falcon", "mpt",
    "starcoder", "gpt-2", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "jina-v2-code",
    "refact", "command-r", "qwen2", "stablelm2", "olmo", "dbrx", "smaug-bpe", "poro-chat",
    "chatglm-bpe", "viking", "jais",
})
"""The pre-tokenizers the llama.cpp in gpt4all 2.8.2 knows."""

EQUIVALENT_PRE_TOKENIZERS = {
    # SmolLM's pre-tokenizer splits with the same regular expressions as refact's
    "smollm": "refact",
}
"""Newer pre-tokenizer names, and the known name that splits text the same way. Each pair
has the same length, so the copy changes the value's bytes in place."""

EMBEDDING_ARCHITECTURES = frozenset({"bert", "nomic-bert"})
"""What gpt4all runs as an embedding model (and only as one)."""


class GgufFacts(msgspec.Struct, kw_only=True):
    architecture: str
    tokenizer: str | None
    pre_tokenizer: str | None
    pre_tokenizer_offset: int | None
    """Byte offset of the pre-tokenizer's value in the file."""
    chat_template: str | None
    trained_context: int | None


def read_gguf(path: Path) -> GgufFacts:
    """The metadata this engine needs, read with the ``gguf`` package's reader."""
    import gguf

    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as error:
        raise ModelLoadError(f"{path} is not a GGUF file gpt4all can read: {error}") from None

    def text(key: str) -> str | None:
        field = reader.get_field(key)
        if field is None or field.types != [gguf.GGUFValueType.STRING]:
            return None
        return bytes(field.parts[field.data[0]]).decode("utf-8")

    architecture = text("general.architecture") or ""
    pre_field = reader.get_field(PRE_TOKENIZER_KEY)
    pre_offset = None
    if pre_field is not None and pre_field.types == [gguf.GGUFValueType.STRING]:
        # a field's parts are its key length, key, type, value length and value, in file order
        value_part = pre_field.data[0]
        pre_offset = pre_field.offset + sum(part.nbytes for part in pre_field.parts[:value_part])
    context_field = reader.get_field(f"{architecture}.context_length")
    return GgufFacts(
        architecture=architecture,
        tokenizer=text("tokenizer.ggml.model"),
        pre_tokenizer=text(PRE_TOKENIZER_KEY),
        pre_tokenizer_offset=pre_offset,
        chat_template=text("tokenizer.chat_template"),
        trained_context=int(context_field.parts[-1][0]) if context_field is not None else None,
    )


def compatible_model(path: Path, facts: GgufFacts, cache_dir: Path, name: str) -> Path:
    """``path`` if gpt4all can load it as it is; else the path of a compatible copy in
    ``cache_dir/gpt4all-compat/<name>.gguf``, written unless an up-to-date one is there.
    Raises ModelLoadError for a pre-tokenizer gpt4all does not know and has no equivalent of."""
    pre = facts.pre_tokenizer
    # llama.cpp reads the pre-tokenizer only for BPE ("gpt2") vocabularies
    if facts.tokenizer != "gpt2" or pre is None or pre in KNOWN_PRE_TOKENIZERS:
        return path
    replacement = EQUIVALENT_PRE_TOKENIZERS.get(pre)
    if replacement is None:
        raise ModelLoadError(
            f"{path.name} declares the pre-tokenizer {pre!r}, which gpt4all 2.8.2 does not know "
            f"and which has no known equivalent; use the llama.cpp engine for this model"
        )
    copy = cache_dir / "gpt4all-compat" / f"{name}.gguf"
    offset = facts.pre_tokenizer_offset
    assert offset is not None
    if _is_current_copy(path, copy, offset, replacement):
        log.debug("using the gpt4all-compatible copy %s", copy)
        return copy
    copy.parent.mkdir(parents=True, exist_ok=True)
    # one writer at a time, across threads (two models may share a file) and processes
    with filelock.FileLock(copy.with_name(copy.name + ".lock")):
        if _is_current_copy(path, copy, offset, replacement):
            return copy
        descriptor, partial_name = tempfile.mkstemp(dir=copy.parent, prefix=copy.name, suffix=".part")
        os.close(descriptor)
        partial = Path(partial_name)
        try:
            shutil.copyfile(path, partial)
            with open(partial, "r+b") as file:
                file.seek(offset)
                if file.read(len(pre)) != pre.encode():
                    raise ModelLoadError(f"{path.name}: the pre-tokenizer value is not where the GGUF reader put it")
                file.seek(offset)
                file.write(replacement.encode())
            os.replace(partial, copy)
        finally:
            partial.unlink(missing_ok=True)
    log.info(
        "gpt4all 2.8.2 does not know the pre-tokenizer %r of %s; wrote a copy that declares "
        "the equivalent %r: %s", pre, path, replacement, copy,
    )
    return copy


def _is_current_copy(original: Path, copy: Path, offset: int, pre_tokenizer: str) -> bool:
    """Whether ``copy`` was made from ``original`` as it is now: the same size, written
    after it, with the replacement where the original has its pre-tokenizer."""
    try:
        original_stat, copy_stat = original.stat(), copy.stat()
        if copy_stat.st_size != original_stat.st_size or copy_stat.st_mtime < original_stat.st_mtime:
            return False
        with open(copy, "rb") as file:
            file.seek(offset)
            return file.read(len(pre_tokenizer)) == pre_tokenizer.encode()
    except FileNotFoundError:
        return False


def copy_name(path: Path, sha256: str | None) -> str:
    """The name of a model's compatible copy: its checksum when configured, else its
    file name and a hash of its location (two files with one name get two copies)."""
    if sha256:
        return sha256.lower()
    where = hashlib.blake2b(str(path.resolve()).encode(), digest_size=6).hexdigest()
    return f"{path.stem}-{where}"
