"""Calls into gpt4all's native library (``gpt4all._pyllmodel``).

This module imports gpt4all at its top, so only the engine's methods import it,
never the package itself. A :class:`NativeModel` is one loaded model with its one
context (KV cache); its methods block and run in the instance's worker thread.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import tempfile
import threading
from typing import Callable, TypeVar

from gpt4all import _pyllmodel
from gpt4all._pyllmodel import LLModel, LLModelPromptContext, PromptCallback, ResponseCallback, llmodel

from lllms_core.plugin_api import ContextLengthExceededError, ModelLoadError

log = logging.getLogger("lllms.gpt4all")

T = TypeVar("T")

MAX_BATCH = 128
"""gpt4all evaluates at most this many prompt tokens at once (LLMODEL_MAX_PROMPT_BATCH)."""

_implementations_loaded = False
_stderr_lock = threading.Lock()
"""Held while stderr is captured: fd 2 is the process's, one capture at a time."""


def _capturing_stderr(call: Callable[[], T]) -> tuple[T, list[str]]:
    """Run ``call`` with the process's stderr (fd 2) captured; return its result and
    the lines written, which are logged: gpt4all's complaints about CUDA backends it
    cannot load (noise on a machine without CUDA) at debug level, the rest as warnings."""
    with _stderr_lock, tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            result = call()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = [line for line in capture.read().decode("utf-8", "replace").splitlines() if line.strip()]
            for line in lines:
                log.log(logging.DEBUG if "cuda" in line.lower() else logging.WARNING, "gpt4all: %s", line)
    return result, lines


def _create(path: str, n_ctx: int, ngl: int, backend: str) -> LLModel:
    """gpt4all's model object. The first one makes gpt4all look for its backends, and
    print a "Failed to load libllamamodel-mainline-cuda..." line per CUDA backend it
    cannot load; that is captured."""
    global _implementations_loaded
    if _implementations_loaded:
        return LLModel(path, n_ctx, ngl, backend)
    model, _ = _capturing_stderr(lambda: LLModel(path, n_ctx, ngl, backend))
    _implementations_loaded = True
    return model


class PromptError(Exception):
    """gpt4all refused a prompt (it reports that through the response callback)."""


class NativeModel:
    """A gpt4all model and its context. ``n_past`` is how many tokens the context holds."""

    def __init__(
        self,
        path: str,
        *,
        context_size: int,
        gpu_layers: int,
        backend: str,
        gpu_device: str | None,
        threads: int | None,
        batch_size: int,
    ):
        self.context_size = context_size
        self.batch_size = min(batch_size, MAX_BATCH)
        try:
            self.llm = _create(path, context_size, gpu_layers, backend)
        except RuntimeError as error:
            raise ModelLoadError(f"gpt4all cannot load {path!r}: {error}") from None
        if gpu_device is not None:
            try:
                self.llm.init_gpu(gpu_device)
            except ValueError as error:
                self.llm.close()
                raise ModelLoadError(f"gpt4all cannot use the GPU {gpu_device!r}: {error}") from None
        # llama.cpp says why a load fails on stderr only
        loaded, messages = _capturing_stderr(self.llm.load_model)
        if not loaded:
            self.llm.close()
            reasons = [line for line in messages if "error" in line.lower()] or messages
            raise ModelLoadError(f"gpt4all could not load {path!r}: {' / '.join(reasons) or 'no reason given'}")
        if threads is not None:
            self.llm.set_thread_count(threads)
        self.context = LLModelPromptContext(n_past=0, n_batch=self.batch_size, context_erase=0.75)

    @property
    def backend(self) -> str:
        return self.llm.backend

    @property
    def device(self) -> str | None:
        return self.llm.device

    @property
    def n_past(self) -> int:
        return self.context.n_past

    def reset(self) -> None:
        """Forget the context: the next prompt is evaluated from the start."""
        self.cut_to(0)

    def cut_to(self, n_past: int) -> None:
        """Keep the context's first ``n_past`` tokens: the next prompt is evaluated after them."""
        self.context.n_past = n_past

    def close(self) -> None:
        self.llm.close()

    def prompt(
        self,
        text: str,
        template: str,
        *,
        special: bool,
        on_prompt_token: Callable[[], bool],
        on_token: Callable[[str], bool] | None = None,
        max_tokens: int = 0,
        sampling: dict | None = None,
        context_shift: bool = True,
    ) -> None:
        """Evaluate ``text`` in ``template`` (gpt4all's: ``%1`` the text, ``%2`` where the
        reply goes) and generate up to ``max_tokens`` tokens after it.

        ``special``: whether special-token text in ``text`` becomes special tokens (the
        template's always does). ``on_prompt_token()`` is called per evaluated prompt token,
        ``on_token(text)`` per generated token; either stops gpt4all by returning False or
        by raising (``trio.Cancelled`` from a cancelled request): then gpt4all stops and
        the exception is raised here once it has. ``context_shift``: when the context is full,
        gpt4all drops its oldest tokens and goes on (else it stops, and a prompt that does not
        fit is refused). Raises :class:`PromptError` when gpt4all refuses the prompt."""
        context = self.context
        context.n_predict = max_tokens
        for name, value in (sampling or {}).items():
            setattr(context, name, value)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        refusal: list[str] = []
        failure: list[BaseException] = []
        evaluated = [0]

        def prompt_callback(token_id: int) -> bool:
            evaluated[0] += 1
            return _guarded(failure, on_prompt_token)

        def response_callback(token_id: int, piece: bytes) -> bool:
            if token_id == -1:  # gpt4all's way of reporting an error
                refusal.append(piece.decode("utf-8", "replace"))
                return False
            assert on_token is not None
            return _guarded(failure, on_token, decoder.decode(piece))

        llmodel.llmodel_prompt(
            self.llm.model,
            text.encode(),
            template.encode(),
            PromptCallback(prompt_callback),
            ResponseCallback(response_callback),
            context_shift,
            ctypes.byref(context),
            special,
            ctypes.c_char_p(),
        )
        if failure:
            raise failure[0]
        if refusal:
            raise PromptError(refusal[0])
        if not context_shift and not evaluated[0] and (text or template.replace("%1", "").replace("%2", "")):
            # without shifting, gpt4all skips a prompt that does not fit (it only warns on stderr)
            raise PromptError("the prompt does not fit in what is left of the context")

    def embed(self, texts: list[str], prefix: str, check: Callable[[], object]) -> tuple[list[list[float]], int]:
        """Embeddings of ``texts`` (a text longer than the context is the mean of its
        chunks), and the number of tokens read. ``check()`` is called between batches; what
        it raises stops gpt4all and is raised here."""
        failure: list[BaseException] = []

        def cancel(batch_sizes, backend) -> bool:
            return not _guarded(failure, lambda: check() or True)

        try:
            result = self.llm.generate_embeddings(texts, prefix, -1, True, False, cancel)
        except _pyllmodel.CancellationError:
            if failure:
                raise failure[0] from None
            raise
        return result["embeddings"], result["n_prompt_tokens"]


def _guarded(failure: list[BaseException], callback: Callable[..., bool], *args) -> bool:
    """Call a callback for gpt4all: an exception (which must not cross into C) is kept
    in ``failure`` and stops gpt4all."""
    if failure:
        return False
    try:
        return callback(*args)
    except BaseException as error:
        failure.append(error)
        return False


def too_long(error: PromptError, context_size: int) -> ContextLengthExceededError:
    return ContextLengthExceededError(f"the prompt does not fit in the context of {context_size} tokens: {error}")
