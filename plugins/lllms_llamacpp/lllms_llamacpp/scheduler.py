"""Continuous batching: one thread per instance decodes all its sequences together.

Each step builds one llama batch holding the next token of every generating
sequence and chunks of the prompts still to evaluate, in sequence order (see
:meth:`Scheduler._step`), decodes it once, then samples every sequence that needs a
token with its own native sampler chain.
Requests join and leave between steps. The scheduler owns the llama context: no
other thread touches it.

Saved states: before a sequence holding a conversation is overwritten by another one
(or cleared for room), its state (tokens and KV cells) goes to the model's prompt cache;
a prompt that extends a saved state gets it restored into its sequence instead of
evaluated, when that is longer than what any sequence holds. Both run here, since this
thread owns the context; a state on disk is read by a helper thread while the request
waits, so a slow disk never stalls the decode loop.

Hand-off to trio: per step, the scheduler groups the events of each request and
schedules one callback per request with ``TrioToken.run_sync_soon``, which never
blocks the scheduler (``trio.from_thread.run_sync`` would wait for the trio loop
at every token of every sequence).
"""

from __future__ import annotations

import codecs
import logging
import math
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from lllms_core.plugin_api import PROMPT_CACHE_BLOCK as BLOCK
from lllms_core.plugin_api import (
    ContextKey,
    EngineError,
    LllmsError,
    PromptCache,
    TokenLogprob,
    TopLogprob,
    common_prefix,
)

from lllms_llamacpp.native import Context, Model, Sampler, log_softmax

if TYPE_CHECKING:
    from lllms_core.plugin_api import CompletionOutput

log = logging.getLogger("lllms.llamacpp")


class SequenceState:
    """What one sequence of the context holds: the tokens in its KV cache."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def __repr__(self) -> str:
        return f"SequenceState(tokens={len(self.tokens)})"


class Delivery:
    """The trio side of a request: a channel its jobs' events go to."""

    def __init__(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.send, self.receive = trio.open_memory_channel(math.inf)

    def deliver(self, events: list[tuple]) -> None:
        try:
            self.send.send_nowait(events)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the request is gone (cancelled)


class TextStream:
    """Turns sampled tokens into what a request sends: UTF-8 across tokens, then the
    engine's ``output`` (stop strings held back, tool calls parsed; see
    :class:`lllms_core.chat.CompletionOutput`), which may end the generation. Special
    tokens render as nothing, except the ``shown`` ones (a tool format's markers)."""

    def __init__(self, model: Model, output: "CompletionOutput", shown: frozenset[int] = frozenset()):
        self.model = model
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.output = output
        self.shown = shown

    def push(self, token: int):
        piece = self.model.spell([token]) if token in self.shown else self.model.piece(token)
        return self.output.push(self.decoder.decode(piece))

    def flush(self):
        return self.output.flush(self.decoder.decode(b"", final=True))


@dataclass(eq=False)
class Job:
    """One sequence's work: evaluate a prompt, then (unless ``evaluate_only``) generate."""

    prompt: list[int]
    seq: int | None
    """The sequence to use; None for a choice that takes a spare sequence."""
    sampler: Sampler | None
    max_new: int
    index: int = 0
    top_logprobs: int | None = None
    """None: no logprobs; else how many alternatives per token."""
    stream: TextStream | None = None
    after: "Job | None" = None
    """Start once this job's prompt is evaluated, copying its prompt from that sequence."""
    evaluate_only: bool = False
    fresh: bool = False
    cache: PromptCache | None = None
    """The model's prompt cache: the sequence's old state is saved there, a longer one restored."""
    previous_key: ContextKey = ()
    """The pool's context key of what the sequence held (the key its saved state is filed under)."""
    delivery: Delivery | None = None
    media: dict = field(default_factory=dict)
    """Prompt position → the image (:class:`lllms_llamacpp.vision.Media`) whose placeholder
    tokens start there; the job holds their chunks until it is released."""
    thinking: Any = None
    """The choice's :class:`~lllms_core.plugin_api.ThinkingBudget`, if its thinking is bounded."""
    # progress, owned by the scheduler thread
    forced: list[int] = field(default_factory=list)
    """Tokens written next instead of sampled (the closing of spent thinking)."""
    pending: list[int] = field(default_factory=list)
    prompt_done: bool = False
    next_token: int | None = None
    generated: int = 0
    cached: int = 0
    disk_checked: bool = False
    reading: bool = False
    """A saved state of the prompt is being read from disk; the job waits for it."""
    cancelled: bool = False
    finished: bool = False


class Scheduler:
    """The decode loop of one instance, in a thread of its own."""

    def __init__(
        self, model: Model, context: Context, *, slots: int, spare: int, n_ctx_seq: int, prompt_chunk: int, projector=None
    ):
        self.model = model
        self.context = context
        self.projector = projector
        self.slots = slots
        self.n_ctx_seq = n_ctx_seq
        self.prompt_chunk = prompt_chunk
        self.sequences = [SequenceState() for _ in range(slots + spare)]
        self.spare = list(range(slots, slots + spare))
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: list[Job] = []
        self.active: list[Job] = []
        self.busy: set[int] = set()
        self.outbox: dict[Delivery, list[tuple]] = {}
        self.steps = 0
        self.decoded_tokens = 0
        self.cache: PromptCache | None = None
        """The model's prompt cache, once a job brought it: idle sequences cleared for room are saved there."""
        self.saved = self.restored = 0
        self.thread = threading.Thread(target=self._run, name="llamacpp-scheduler", daemon=True)
        self.thread.start()

    # --- called from trio ---------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        self.inbox.put(("submit", jobs))

    def cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.cancelled = True
        self.inbox.put(("cancel", jobs))

    def stop(self) -> None:
        self.inbox.put(("stop", None))
        self.thread.join()

    def save_all(self, cache: PromptCache, keys: list[ContextKey]) -> None:
        """Save every slot's state into ``cache`` (blocking until done: call it in a worker thread)."""
        done = threading.Event()
        self.inbox.put(("save", (cache, keys, done)))
        done.wait()

    # --- the loop -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            # each pass ends by admitting what it can: with no active job, the waiting ones
            # wait for a sequence or a prompt that nothing will free before a command arrives
            idle = not self.active
            try:
                command, jobs = self.inbox.get(block=idle)
            except queue.Empty:
                command = None
            while command is not None:
                if command == "stop":
                    self._fail_all(EngineError("the model instance was disposed"))
                    self._flush()
                    return
                if command == "submit":
                    self.waiting.extend(jobs)
                elif command == "read":
                    jobs.reading = False
                elif command == "save":
                    cache, keys, done = jobs
                    try:
                        for seq in range(self.slots):
                            self._save(seq, cache, keys[seq] if seq < len(keys) else ())
                    except Exception:
                        log.exception("saving the sequences' states failed")
                    done.set()
                try:
                    command, jobs = self.inbox.get_nowait()
                except queue.Empty:
                    command = None
            try:
                self._drop_cancelled()
                self._admit()
                if self.active:
                    self._step()
                self._drop_cancelled()
                self._admit()
            except Exception as error:  # a bug or a native failure must not stop the instance
                log.exception("llama.cpp scheduler step failed")
                self._fail_all(EngineError(f"llama.cpp failed: {error}"), reset=True)
            self._flush()

    def _drop_cancelled(self) -> None:
        for job in [job for job in self.waiting if job.cancelled]:
            self.waiting.remove(job)
            self._release(job)
        for job in [job for job in self.active if job.cancelled]:
            self._end(job)

    def _admit(self) -> None:
        for job in list(self.waiting):
            if job.after is not None and not (job.after.prompt_done or job.after.finished):
                continue
            if job.seq is None:
                free = [seq for seq in self.spare if seq not in self.busy]
                if not free:
                    continue
                job.seq = free[0]
            elif job.seq in self.busy:
                continue
            if job.cache is not None and self._read_first(job):
                continue
            self.waiting.remove(job)
            self.busy.add(job.seq)
            self._reuse_prefix(job)
            self.active.append(job)

    def _reusable(self, job: Job) -> int:
        """How many leading prompt tokens a job may take from memory: the last one must be
        evaluated for its logits (unless nothing is generated), and no image is cut."""
        return self._before_media(job, len(job.prompt) if job.evaluate_only else len(job.prompt) - 1)

    def _best_held(self, job: Job) -> tuple[int, int]:
        """The sequence holding the longest prefix of the job's prompt (its own first), and its length."""
        seq, prompt, limit = job.seq, job.prompt, self._reusable(job)
        state = self.sequences[seq]
        own = 0 if job.fresh else self._before_media(job, min(common_prefix(state.tokens, prompt), limit))
        if self.model.recurrent and own < len(state.tokens):
            own = 0
        source, best = seq, own
        for other, other_state in enumerate(self.sequences):
            if other != seq and not self.model.recurrent:
                length = self._before_media(job, min(common_prefix(other_state.tokens, prompt), limit))
                if length > best:
                    source, best = other, length
        return source, best

    def _read_first(self, job: Job) -> bool:
        """Whether the job must wait for a saved state of its prompt to be read from disk
        (started here, once, in a helper thread), because it is longer than any in memory."""
        self.cache = job.cache
        if job.reading:
            return True
        if job.disk_checked:
            return False
        job.disk_checked = True
        prompt = job.prompt[: self._reusable(job)]
        _, held = self._best_held(job)
        if len(prompt) - held < BLOCK or not job.cache.needs_read(prompt, better_than=held):
            return False
        job.reading = True

        def read() -> None:
            try:
                job.cache.prefetch(prompt, better_than=held)
            except Exception:
                log.exception("reading a saved state failed")
            self.inbox.put(("read", job))

        threading.Thread(target=read, name="llamacpp-state-read", daemon=True).start()
        return True

    def _reuse_prefix(self, job: Job) -> None:
        """Keep the longest common token prefix of the prompt with this sequence, or copy a
        longer one from another sequence, or restore a longer saved state; the rest of the
        prompt is left to evaluate. What the sequence held beyond the kept prefix is saved
        to the prompt cache first."""
        seq, prompt, context = job.seq, job.prompt, self.context
        state = self.sequences[seq]
        if job.cache is not None and len(state.tokens) - common_prefix(state.tokens, prompt) >= BLOCK:
            self._save(seq, job.cache, job.previous_key)
        if job.fresh:
            context.remove(seq)
            state.tokens = []
        source, best = self._best_held(job)
        limit = self._reusable(job)
        found = None
        if job.cache is not None and limit - best >= BLOCK:  # a saved state could spare a block or more
            found = job.cache.lookup(prompt[:limit], better_than=best)
        if found is not None:
            found = (found[0], self._before_media(job, found[1]))
        if found is not None and found[1] > best and self._restore(seq, *found):
            entry, best = found
            job.cache.restored(entry, best)
            self.restored += 1
        elif source != seq:
            context.remove(seq)
            context.copy(source, seq, best)
        elif not context.remove(seq, best):
            context.remove(seq)
            best = 0
        state.tokens = prompt[:best]
        job.cached = best
        job.pending = prompt[best:]
        if not job.pending:
            job.prompt_done = True

    @staticmethod
    def _before_media(job: Job, length: int) -> int:
        """``length``, or the start of an image whose placeholders it would cut."""
        for start, media in job.media.items():
            if start < length < start + media.n_pos:
                return start
        return length

    def _evaluate_media(self) -> None:
        """Evaluate the image each prompt has reached, if any (mtmd decodes it on its own)."""
        from lllms_llamacpp.vision import evaluate

        for job in list(self.active):
            if job.prompt_done or not job.media:
                continue
            state = self.sequences[job.seq]
            media = job.media.get(len(state.tokens))
            if media is None:
                continue
            try:
                evaluate(self.projector, self.context, media, len(state.tokens), job.seq)
            except LllmsError as error:
                self.context.remove(job.seq, len(state.tokens))
                self._fail(job, error)
                continue
            state.tokens.extend(media.placeholders)
            job.pending = job.pending[media.n_pos :]

    def _save(self, seq: int, cache: PromptCache, key: ContextKey) -> None:
        """Save the state of a sequence into the prompt cache, unless it holds one already."""
        tokens = self.sequences[seq].tokens
        if len(tokens) < BLOCK or cache.holds(tokens):
            return
        data = self.context.save_state(seq)
        if data and cache.put(tokens, data, len(data), key):
            self.saved += 1

    def _restore(self, seq: int, entry, length: int) -> bool:
        """Put a saved state into a sequence, cut back to the ``length`` tokens the prompt shares."""
        data = entry.data  # read once: another thread may evict it meanwhile
        if data is None or (self.model.recurrent and length < len(entry.tokens)):
            return False
        if not self.context.restore_state(seq, data):
            return False
        if length < len(entry.tokens) and not self.context.remove(seq, length):
            self.context.remove(seq)
            return False
        return True

    def _step(self) -> None:
        if any(job.media for job in self.active):
            self._evaluate_media()
        context = self.context
        context.clear_batch()
        generating = [job for job in self.active if job.prompt_done and job.next_token is not None]
        chunks: list[tuple[Job, list[int]]] = [(job, [job.next_token]) for job in generating]
        budget = context.n_batch - len(generating)
        if generating:
            budget = min(budget, self.prompt_chunk)
        for job in self.active:
            if job.prompt_done or budget <= 0:
                continue
            start = len(self.sequences[job.seq].tokens)
            if start in job.media:
                continue  # an image the next step evaluates
            text_left = min((position - start for position in job.media if position > start), default=len(job.pending))
            chunk = job.pending[: min(budget, text_left)]
            budget -= len(chunk)
            chunks.append((job, chunk))
        for job in [job for job in self.active if job.prompt_done and job.evaluate_only]:
            self._finish(job, "stop")
        if not chunks:
            return
        # over a KV cache per sequence, llama.cpp computes a batch in one pass only for runs of
        # consecutive sequence ids in batch order (one pass each otherwise): sequences in order
        chunks.sort(key=lambda item: item[0].seq)
        outputs: list[tuple[Job, int]] = []
        for job, chunk in chunks:
            start = len(self.sequences[job.seq].tokens)
            logits = job.prompt_done or (len(chunk) == len(job.pending) and not job.evaluate_only)
            for offset, token in enumerate(chunk):
                index = context.add(token, start + offset, job.seq, logits and offset == len(chunk) - 1)
            if logits:
                outputs.append((job, index))
        status = context.decode()
        if status == 1 and self._evict_idle():
            status = context.decode()
        if status != 0:
            self._decode_failed(status, [job for job, _ in chunks])
            return
        self.steps += 1
        self.decoded_tokens += context.batch.n_tokens
        for job, tokens in chunks:
            self.sequences[job.seq].tokens.extend(tokens)
            if not job.prompt_done:
                job.pending = job.pending[len(tokens) :]
                if not job.pending:
                    job.prompt_done = True
                    if job.evaluate_only:
                        self._finish(job, "stop")
        for job, index in outputs:
            self._sample(job, index)

    def _sample(self, job: Job, index: int) -> None:
        token = self._forced_token(job)
        if token is None:
            token = job.sampler.sample(self.context, index)
        logprobs = self._logprobs(job, index, token) if job.top_logprobs is not None else None
        if self.model.is_eog(token):
            self._finish(job, "stop")
            return
        job.generated += 1
        if job.thinking is not None:
            job.thinking.advance(self.model.spell([token]).decode("utf-8", "replace"))
        text, stopped = job.stream.push(token)
        if text or logprobs:
            self._emit(job, ("chunk", job.index, text, logprobs))
        if stopped:
            self._finish(job, "stop")
        elif job.generated >= job.max_new:
            self._finish(job, "length")
        else:
            job.next_token = token

    def _forced_token(self, job: Job) -> int | None:
        """The next token of the closing tag once the job's thinking budget is spent (the
        sampler chain does not see it: a grammar or penalty applies to what the model writes)."""
        thinking = job.thinking
        if thinking is not None and thinking.exhausted:
            thinking.closed()
            job.forced = self.model.tokenize(thinking.closing, add_special=False, parse_special=True)
        return job.forced.pop(0) if job.forced else None

    def _logprobs(self, job: Job, index: int, token: int) -> list[TokenLogprob]:
        logprobs = log_softmax(self.context.logits(index).astype("float64"))
        top: list[TopLogprob] = []
        if job.top_logprobs:
            best = logprobs.argpartition(-job.top_logprobs)[-job.top_logprobs :]
            best = best[logprobs[best].argsort()[::-1]]
            top = [self._top(int(candidate), float(logprobs[candidate])) for candidate in best]
        chosen = self._top(token, float(logprobs[token]))
        return [TokenLogprob(token=chosen.token, logprob=chosen.logprob, bytes=chosen.bytes, top_logprobs=top)]

    def _top(self, token: int, logprob: float) -> TopLogprob:
        piece = self.model.piece(token)
        return TopLogprob(token=piece.decode("utf-8", "replace"), logprob=logprob, bytes=list(piece))

    def _finish(self, job: Job, reason: str) -> None:
        if job.finished:
            return
        rest = job.stream.flush() if job.stream is not None else ""
        if rest:
            self._emit(job, ("chunk", job.index, rest, None))
        self._emit(job, ("done", job.index, reason, (len(job.prompt), job.generated, job.cached)))
        self._end(job)

    def _end(self, job: Job) -> None:
        job.finished = True
        if job in self.active:
            self.active.remove(job)
        self.busy.discard(job.seq)
        if job.seq is not None and job.seq >= self.slots:
            self.context.remove(job.seq)
            self.sequences[job.seq].tokens = []
        self._release(job)

    def _release(self, job: Job) -> None:
        job.finished = True
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        release_media(job)

    def _evict_idle(self) -> bool:
        """Free the KV cells of sequences no job uses (their states saved); True when something was freed."""
        freed = False
        for seq, state in enumerate(self.sequences):
            if seq not in self.busy and state.tokens:
                if self.cache is not None and seq < self.slots:
                    self._save(seq, self.cache, ())
                self.context.remove(seq)
                state.tokens = []
                freed = True
        return freed

    def _decode_failed(self, status: int, jobs: list[Job]) -> None:
        if status == 1:
            error: LllmsError = EngineError("the model's context memory is full; retry the request")
        else:
            error = EngineError(f"llama.cpp could not decode the batch (status {status})")
        for job in jobs:
            if status != 1:  # the memory of the batch's sequences is unknown now
                self.context.remove(job.seq)
                self.sequences[job.seq].tokens = []
            if job.prompt_done:
                self._finish(job, "length")
            else:
                self._fail(job, error)

    def _fail(self, job: Job, error: LllmsError) -> None:
        self._emit(job, ("error", job.index, error, None))
        self._end(job)

    def _fail_all(self, error: LllmsError, reset: bool = False) -> None:
        for job in list(self.active):
            if reset:
                self.context.remove(job.seq)
                self.sequences[job.seq].tokens = []
            self._fail(job, error)
        for job in self.waiting:
            self._emit(job, ("error", job.index, error, None))
            self._release(job)
        self.waiting = []

    def _emit(self, job: Job, event: tuple) -> None:
        if job.delivery is not None and not job.cancelled:
            self.outbox.setdefault(job.delivery, []).append(event)

    def _flush(self) -> None:
        for delivery, events in self.outbox.items():
            try:
                delivery.token.run_sync_soon(delivery.deliver, events)
            except trio.RunFinishedError:
                pass
        self.outbox = {}

    def info(self) -> dict[str, Any]:
        per_token = self.model.kv_bytes_per_token
        return {
            "sequences": [
                {"sequence": seq, "tokens": len(state.tokens), "kv_bytes": len(state.tokens) * per_token}
                for seq, state in enumerate(self.sequences)
            ],
            "active_sequences": len(self.active),
            "waiting_jobs": len(self.waiting),
            "decode_steps": self.steps,
            "decoded_tokens": self.decoded_tokens,
            "states_saved": self.saved,
            "states_restored": self.restored,
        }



def release_media(job: Job) -> None:
    """Give back the job's hold on its images' chunks (once)."""
    owners = {id(media.owner): media.owner for media in job.media.values()}
    job.media = {}
    for owner in owners.values():
        owner.release()
