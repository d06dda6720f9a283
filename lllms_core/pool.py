"""The model pool: loaded instances, their sequence slots, and the queue of
requests waiting for one.

The pool is an async context manager owning a nursery; each instance lives in
a task of it, started with ``nursery.start`` so a load can be awaited, and is
disposed in a shielded ``finally`` so disposal is certain. A request gets a
slot only through ``async with pool.acquire(model_id, key) as slot``.

A slot is one sequence of an instance with its own context state. Waiting requests
that continue a conversation held in an idle slot or saved in the prompt cache, or find
an empty slot, go first, and so do those that have waited ``OVERDUE_AFTER_S``; then the
others, first come, first served (one dispatch function does it whenever anything
changes). Each takes, in this order: an idle slot whose context is the longest prefix of
the request's → when the model's prompt cache holds a longer prefix, an idle slot
without context or else the least recently used idle slot, reset, for the engine to
restore that state into → an idle slot without context → a new instance (below
``max_instances``, within the memory budget) → the least recently used idle slot,
reset → wait. A slot whose conversation a waiting request continues is left to that
request: another takes it only when no other idle slot will do. A global
``concurrency`` limit gates how many slots are busy at once.

Memory: every instance counts what it holds (or, before it is loaded, the engine's
estimate), and the prompt caches count their RAM; the process's resident memory counts
when it is more, plus what loads in flight will take. A new instance that would take the
server past its memory budget first has states leave the prompt caches' RAM, then the idle
instances of other models disposed, least recently used first (their states saved), but
not one whose idle slots requests waiting for its model are about to take, and starts once
they are gone; a model that could not fit even with everything else gone is refused with a
503 naming the budget. The caches grow only into the room the budget leaves.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import deque
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import trio

from lllms_core.config import Config, ModelConfig
from lllms_core.context import ContextKey, common_prefix
from lllms_core.engine import Device, Engine, EngineInstance, Progress, TaskContext
from lllms_core.errors import LllmsError, ModelLoadError, ModelNotFoundError, QueueFullError, ServiceUnavailableError
from lllms_core.machine import MIB, process_rss, release_free_memory, this_machine
from lllms_core.prompt_cache import PromptCache

log = logging.getLogger("lllms.pool")

RETRY_MIN_INSTANCES_AFTER = (1.0, 60.0)
"""Back-off (first, longest) before refilling ``min_instances`` after a failed load."""
PROMPT_CACHE_MAX_MIB = 8192
"""The default RAM tier of a model's prompt cache is an eighth of the budget, at most this (llama-server's default)."""
GENERATION_TASKS = ("chat-completion", "text-completion")
OVERDUE_AFTER_S = 120.0
"""A request that has waited this long is served in its arrival order, before the
conversations that continue but came after it: continuing conversations first must not
starve a new one when they never stop coming (agents in loops). Short bounds turn a crowd's
dispatch into first come, first served: measured with 24 chats × 4 turns on 8 slots, 10 s
made follow-ups wait 33.7 s against 7–8 s (docs/benchmarks.md)."""


class Slot:
    """One sequence of an instance: the unit a request acquires."""

    def __init__(self, instance: "Instance", index: int):
        self.instance = instance
        self.index = index
        self.busy = False
        self.context_key: ContextKey = ()
        self.fresh = True
        """True until a task ran in this slot since it was created or reset."""
        self.previous_key: ContextKey = ()
        """The context the slot held when it was last assigned or reset (the engine saves it under this key)."""
        self.last_used = 0.0
        self.progress = Progress()
        """How far the task running in the slot has come, when its engine reports it."""

    def reset(self) -> None:
        self.previous_key, self.context_key = self.context_key, ()
        self.fresh = True

    def task_context(self) -> TaskContext:
        instance = self.instance
        return TaskContext(
            instance=instance.engine_instance,
            slot=self.index,
            model=instance.model,
            fresh=self.fresh,
            progress=self.progress,
            prompt_cache=instance.prompt_cache,
            previous_key=self.previous_key,
        )


class Instance:
    """A loaded (or loading) model with its slots; its life is one task of the pool."""

    def __init__(self, model: ModelConfig, engine: Engine, device: Device, estimate: int, prompt_cache: PromptCache | None):
        self.id = f"{model.id}:{secrets.token_hex(4)}"
        self.model = model
        self.engine = engine
        self.device = device
        self.estimate = estimate
        """Bytes the engine expected the instance to take, before it was loaded."""
        self.prompt_cache = prompt_cache
        self.state = "loading"
        self.engine_instance: EngineInstance | None = None
        self.slots: list[Slot] = []
        self.created = time.time()
        self.last_used = trio.current_time()
        self.last_used_wall: float | None = None
        self.dispose_requested = False
        self.draining = False
        """Takes no new requests and is disposed once idle (to make room in memory)."""
        self.wake = trio.Event()
        self.keep_alive: float | None = None
        """Seconds to live once idle, set by the last request that asked (Ollama's ``keep_alive``); else the model's ``ttl``."""

    @property
    def ready(self) -> bool:
        return self.state == "ready" and not self.dispose_requested and not self.draining

    @property
    def idle(self) -> bool:
        return not any(slot.busy for slot in self.slots)

    def poke(self) -> None:
        self.wake.set()

    @property
    def footprint(self) -> int:
        """Bytes of memory the instance holds (what it reports once loaded, else the estimate)."""
        reported = self.engine_instance.memory_bytes if self.engine_instance is not None else None
        return reported if reported is not None else self.estimate

    def status(self) -> dict[str, Any]:
        state = self.state
        if state == "ready":
            state = "busy" if not self.idle else "idle"
        return {
            "id": self.id,
            "model": self.model.id,
            "engine": self.engine.name,
            "state": state,
            "device": "gpu" if self.device.gpu else "cpu",
            "created": _iso(self.created),
            "last_used": _iso(self.last_used_wall),
            "memory_bytes": self.footprint,
            "slots": [
                {
                    "index": slot.index,
                    "busy": slot.busy,
                    "context": slot.context_key[-1] if slot.context_key else None,
                    "context_depth": len(slot.context_key),
                    "progress": slot.progress.report() if slot.busy else None,
                }
                for slot in self.slots
            ],
            "info": self.engine_instance.info() if self.engine_instance is not None else {},
        }


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


class _Waiter:
    __slots__ = ("model", "key", "nested", "since", "event", "slot", "error", "finished")

    def __init__(self, model: ModelConfig, key: ContextKey, nested: bool = False):
        self.model = model
        self.key = key
        self.since = trio.current_time()
        self.nested = nested
        """Made by a task that holds a slot already (a composed engine): it is part of that
        request, which passed the concurrency gate and the queue limit."""
        self.event = trio.Event()
        self.slot: Slot | None = None
        self.error: LllmsError | None = None
        self.finished = False
        """Set once the slot went back to the pool, or the waiter left the queue."""


def _continues(key: ContextKey, slot: Slot) -> bool:
    """Whether a request with context ``key`` continues the whole conversation ``slot`` holds."""
    held = slot.context_key
    return bool(held) and key[: len(held)] == held


def _kept_for_another(slot: Slot, waiter: _Waiter, claims: dict[Slot, _Waiter]) -> bool:
    """Whether another waiting request continues the slot's conversation, and ``waiter`` does not."""
    claimant = claims.get(slot)
    return claimant is not None and claimant is not waiter and not _continues(waiter.key, slot)


class Lease:
    """A place in the pool's queue; ``async with`` waits for a slot and releases it after.

    Creating it enqueues at once, so an unknown model or a full queue is raised
    before any waiting. A lease that is never entered must be ``withdraw``n.
    """

    def __init__(self, pool: "ModelPool", model_id: str, key: ContextKey, nested: bool = False):
        self._pool = pool
        self._waiter = pool._enqueue(model_id, key, nested)

    async def __aenter__(self) -> Slot:
        return await self._pool._wait(self._waiter)

    async def __aexit__(self, *exc_info) -> None:
        self._pool._finish(self._waiter)

    def withdraw(self) -> None:
        """Give the place or slot back if the lease was never used (idempotent)."""
        self._pool._finish(self._waiter)

    def leave_queue(self) -> None:
        """Leave the queue now if still waiting there; a granted slot is left to its user."""
        if self._waiter in self._pool._waiters:
            self._pool._finish(self._waiter)


class ModelPool:
    def __init__(self, config: Config, engines: dict[str, Engine], store, nursery: trio.Nursery):
        self.config = config
        self.engines = engines
        self.store = store
        self._nursery = nursery
        self.instances: dict[str, Instance] = {}
        self._waiters: deque[_Waiter] = deque()
        self._processing = 0
        self._gpu_holder: Instance | None = None
        self._startup: list[trio.Event] = []
        self._retry_delay: dict[str, float] = {}
        self._slots_seen: dict[str, int] = {}
        self._start_errors: dict[str, str] = {}
        """Why the last load (or blocking preparation) of a model the server starts with failed."""
        self._footprint_seen: dict[str, int] = {}
        self._promise: tuple[str, int] | None = None
        """The model that instances are being disposed for, and the bytes its load will take."""
        self._releasing_heap = False
        self._heap_released = False
        """Whether the C heap's free memory went back to the system since the last request
        ended, to admit a model before it is refused."""
        self._preparing: set[str] = set()
        self._gpu_usable: dict[str, bool] = {}
        """Whether each engine can use a GPU here, asked once (in a worker thread: the engine
        may import its library to tell) before the pool starts."""
        self.closed = False
        budget = config.server.memory_budget_mib
        self.memory_budget = budget * MIB if budget is not None else this_machine().memory_budget()
        self._started_with = self.baseline = process_rss()
        """Memory the server process holds beside its instances and caches (interpreter,
        libraries): measured at start, and again whenever no instance is loading or leaving."""
        ram = config.server.prompt_cache_mib
        ram_bytes = ram * MIB if ram is not None else min(PROMPT_CACHE_MAX_MIB * MIB, self.memory_budget // 8)
        disk_bytes = int(config.server.prompt_cache_disk_gib * 1024 * MIB)
        self.caches: dict[str, PromptCache] = {
            model.id: PromptCache(
                model.id, ram_bytes=ram_bytes, disk_bytes=disk_bytes, directory=Path(store.cache_dir) / "prompt-cache" / model.id
            )
            for model in config.models.values()
            if model.task in GENERATION_TASKS
        }

    # --- public ---------------------------------------------------------------

    def acquire(self, model_id: str, key: ContextKey = (), *, nested: bool = False) -> Lease:
        """Enqueue a request for a slot of ``model_id``; use as ``async with``.

        ``nested``: the request is made by a task that holds a slot (a composed engine calling
        another model). It waits for a slot of its model like the others, but neither for the
        concurrency limit nor against the queue limit: its task passed both, and holds its
        slot until this request ends, so waiting for the gate could wait forever."""
        return Lease(self, model_id, key, nested)

    @property
    def processing(self) -> int:
        return self._processing

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def ready(self) -> bool:
        """Whether the instances and preparations that must exist at start are done, and
        none of them failed (a model whose loads keep failing keeps the server not ready)."""
        return all(event.is_set() for event in self._startup) and not self.failures()

    def failures(self) -> dict[str, str]:
        """The models that must be ready at start and are not, because loading (with
        ``min_instances``) or preparing them (``prepare = "blocking"``) failed: their errors."""
        return {
            model_id: error
            for model_id, error in self._start_errors.items()
            if not any(i.model.id == model_id and i.ready for i in self.instances.values())
        }

    async def wait_ready(self) -> None:
        for event in self._startup:
            await event.wait()

    def status(self) -> dict[str, Any]:
        return {
            "processing": self._processing,
            "queued": len(self._waiters),
            "concurrency": self.config.server.concurrency,
            "memory": {
                "budget_bytes": self.memory_budget,
                "used_bytes": self._memory_used(),
                "baseline_bytes": self.baseline,
                "resident_bytes": process_rss(),
            },
            "instances": [instance.status() for instance in self.instances.values()],
            "prompt_caches": {model_id: cache.status() for model_id, cache in self.caches.items()},
        }

    def context_keys(self) -> list[ContextKey]:
        """The contexts this pool holds (so a request continuing one is cheaper here);
        what a cluster's router compares requests with."""
        return [slot.context_key for instance in self.instances.values() for slot in instance.slots if slot.context_key]

    # --- start and stop -------------------------------------------------------

    async def _probe_gpus(self) -> None:
        """Ask each engine that a ``device.gpu = "auto"`` model uses whether it can use a GPU
        here, in a worker thread: the answer may take importing the engine's library."""
        for name in sorted({model.engine for model in self.config.models.values() if model.device.gpu == "auto"}):
            engine = self.engines[name]
            try:
                self._gpu_usable[name] = bool(await trio.to_thread.run_sync(engine.gpu_available))
            except Exception as error:  # a broken GPU driver must not stop the server: run on the CPU
                log.warning("engine %s could not tell whether a GPU is usable (%s): using the CPU", name, error)
                self._gpu_usable[name] = False

    def _start(self) -> None:
        # a model that must have the GPU starts first, so that it gets it
        models = sorted(self.config.models.values(), key=lambda m: not m.device.requires_gpu)
        for model in models:
            if model.min_instances > 0:
                for _ in range(model.min_instances):
                    self._startup.append(self._spawn(model))
            elif model.prepare in ("blocking", "async"):
                done = trio.Event()
                if model.prepare == "blocking":
                    self._startup.append(done)
                self._nursery.start_soon(self._prepare_in_background, model, done)

    async def _prepare_in_background(self, model: ModelConfig, done: trio.Event) -> None:
        try:
            await self.store.prepare(model)
        except LllmsError as error:
            log.error("preparing model %r failed: %s", model.id, error.message)
            if model.prepare == "blocking":
                self._start_errors[model.id] = error.message
        finally:
            done.set()

    def _close(self) -> None:
        self.closed = True
        error = ServiceUnavailableError("the server is shutting down")
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = error
            waiter.event.set()

    # --- the queue ------------------------------------------------------------

    def _enqueue(self, model_id: str, key: ContextKey, nested: bool = False) -> _Waiter:
        if self.closed:
            raise ServiceUnavailableError("the server is shutting down")
        model = self.config.models.get(model_id)
        if model is None:
            raise ModelNotFoundError(f"The model {model_id!r} does not exist", param="model")
        waiter = _Waiter(model, key, nested)
        self._waiters.append(waiter)
        self._dispatch()
        if waiter.slot is None and waiter.error is None and not nested:
            waiting = sum(1 for w in self._waiters if w.slot is None and not w.nested)
            if waiting > self.config.server.max_queue:
                self._waiters.remove(waiter)
                raise QueueFullError(
                    f"too many requests are waiting ({waiting - 1}); try again later", retry_after=1
                )
        return waiter

    async def _wait(self, waiter: _Waiter) -> Slot:
        try:
            await waiter.event.wait()
        except BaseException:
            self._finish(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error
        assert waiter.slot is not None
        return waiter.slot

    def _finish(self, waiter: _Waiter) -> None:
        """Leave the queue, or give the slot back: whichever applies, once."""
        if waiter.finished:
            return
        waiter.finished = True
        if waiter.slot is not None:
            self._release(waiter.slot)
        elif waiter in self._waiters:
            self._waiters.remove(waiter)
            self._dispatch()

    def _release(self, slot: Slot) -> None:
        slot.busy = False
        self._processing -= 1
        instance = slot.instance
        if instance.draining and instance.idle:
            instance.dispose_requested = True
        slot.last_used = instance.last_used = trio.current_time()
        instance.last_used_wall = time.time()
        instance.poke()
        self._fit_memory()
        self._dispatch()

    # --- dispatch -------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand idle slots to waiting requests, and spawn or evict instances as they need:
        first, in arrival order, the requests that continue a conversation held in an idle slot
        or saved in the prompt cache, or find an empty slot, and those that have waited
        ``OVERDUE_AFTER_S``; then the others, first come, first served."""
        if self.closed:
            return
        # a loading instance will serve as many requests as the model's last instance had slots
        loading_capacity = {
            instance.id: self._slots_seen.get(instance.model.id, 1)
            for instance in self.instances.values()
            if instance.state == "loading"
        }
        limit = self.config.server.concurrency
        claims = self._claims()
        overdue_since = trio.current_time() - OVERDUE_AFTER_S
        # continuing conversations first: their history is in an idle slot or the prompt cache, so
        # they cost the least, and the people (or agents) waiting mid-conversation get their turn
        # soonest; measured with 24 chats on 8 slots, first come, first served made follow-ups wait
        # 5× longer and the whole crowd take 7% longer (docs/benchmarks.md). A request that has
        # waited OVERDUE_AFTER_S keeps its arrival order among them, so new conversations are not
        # starved. A nested request, made by a task that holds a slot, passes the concurrency limit.
        for waiter in list(self._waiters):
            if limit is not None and self._processing >= limit and not waiter.nested:
                continue
            slot = self._matching_slot(waiter, claims)
            if slot is not None:
                self._assign(waiter, slot)
            elif waiter.since <= overdue_since:
                self._serve_in_turn(waiter, claims, loading_capacity)
        # then the others, first come, first served (no idle slot matches them: the first pass
        # only took idle slots away, and served the overdue ones it could)
        for waiter in list(self._waiters):
            if waiter.since <= overdue_since or (limit is not None and self._processing >= limit and not waiter.nested):
                continue
            self._serve_in_turn(waiter, claims, loading_capacity)

    def _serve_in_turn(self, waiter: _Waiter, claims: dict[Slot, _Waiter], loading_capacity: dict[str, int]) -> None:
        """Give a waiter no idle slot matches the least recently used idle slot, or an instance
        to come (one loading, or a new one), or the GPU it must have."""
        model = waiter.model
        loading = next((i for i in self.instances.values() if i.model is model and loading_capacity.get(i.id)), None)
        if loading is not None:
            loading_capacity[loading.id] -= 1
            return
        if self._can_spawn(model):
            if self._prepared(model) and self._memory_allows(model, waiter):
                self._spawn(model)  # the waiter takes a slot once it is loaded
            return
        slot = self._least_recently_used_slot(waiter, claims)
        if slot is None:
            self._make_room_on_gpu(model)
            return
        slot.reset()
        self._assign(waiter, slot)

    def _assign(self, waiter: _Waiter, slot: Slot) -> None:
        if not slot.fresh:
            slot.previous_key = slot.context_key
        self._waiters.remove(waiter)
        slot.busy = True
        slot.progress = Progress()
        self._processing += 1
        waiter.slot = slot
        waiter.event.set()
        slot.instance.poke()

    def _idle_slots(self, model: ModelConfig):
        for instance in self.instances.values():
            if instance.model is model and instance.ready:
                for slot in instance.slots:
                    if not slot.busy:
                        yield slot

    def _claims(self) -> dict[Slot, _Waiter]:
        """The idle slots whose conversation a waiting request continues, each with the
        oldest such request."""
        claims: dict[Slot, _Waiter] = {}
        for waiter in self._waiters:
            for slot in self._idle_slots(waiter.model):
                if _continues(waiter.key, slot):
                    claims.setdefault(slot, waiter)
        return claims

    def _matching_slot(self, waiter: _Waiter, claims: dict[Slot, _Waiter]) -> Slot | None:
        """The idle slot with the longest prefix of the waiter's key (leaving aside slots whose
        conversation another waiting request continues); else, when the prompt cache holds a
        longer one, an empty or the least recently used slot (reset) to restore it into; else
        an empty slot."""
        model, key = waiter.model, waiter.key
        best, best_length, empty = None, 0, None
        for slot in self._idle_slots(model):
            if _kept_for_another(slot, waiter, claims):
                continue
            length = common_prefix(slot.context_key, key)
            if length > best_length:
                best, best_length = slot, length
            elif empty is None and not slot.context_key:
                empty = slot
        cache = self.caches.get(model.id)
        cached = cache.key_match(key) if cache is not None and key else 0
        if cached > best_length:
            slot = empty or self._least_recently_used_slot(waiter, claims)
            if slot is not None and slot is not empty:
                slot.reset()
            return slot
        return best or empty

    def _least_recently_used_slot(self, waiter: _Waiter, claims: dict[Slot, _Waiter]) -> Slot | None:
        """The least recently used idle slot of the waiter's model, preferring one whose
        conversation no other waiting request is about to continue."""
        return min(
            self._idle_slots(waiter.model),
            key=lambda slot: (_kept_for_another(slot, waiter, claims), slot.last_used),
            default=None,
        )

    # --- memory -----------------------------------------------------------------

    def _memory_used(self) -> int:
        """What counts against the budget: the server itself, its instances and its prompt
        caches, or the process's resident memory when that is more (what engines hold beyond
        what they report, a heap that grew) together with what the instances still loading
        will take (their memory is not resident yet, so resident memory alone would admit a
        second load beside them)."""
        accounted = (
            self.baseline
            + sum(instance.footprint for instance in self.instances.values())
            + sum(cache.ram_bytes for cache in self.caches.values())
        )
        coming = sum(instance.footprint for instance in self.instances.values() if instance.engine_instance is None)
        return max(accounted, process_rss() + coming)

    def _measure_baseline(self) -> None:
        """What the process holds beside its instances and caches, read while no instance is
        loading or being disposed: libraries an engine loaded stay (torch), and only the
        process's resident memory shows them."""
        if any(instance.state != "ready" for instance in self.instances.values()):
            return
        held = sum(instance.footprint for instance in self.instances.values()) + sum(
            cache.ram_bytes for cache in self.caches.values()
        )
        self.baseline = max(self._started_with, process_rss() - held)

    def _estimate(self, model: ModelConfig) -> int:
        """Bytes a new instance of ``model`` will take: as much as its last one did, else the engine's estimate."""
        if model.id in self._footprint_seen:
            return self._footprint_seen[model.id]
        _, prepared = self.store.preparation(model)
        if not isinstance(prepared, Path):
            try:
                prepared = self.store.location(model)
            except LllmsError:
                prepared = None
        engine = self.engines[model.engine]
        return engine.memory_estimate(model, prepared, self._device(model, engine)) or 0

    def _prepared(self, model: ModelConfig) -> bool:
        """Whether the model is prepared (downloaded, converted), so that its engine can tell
        how much memory an instance takes; if not, prepare it and dispatch again after."""
        state, _ = self.store.preparation(model)
        if state == "ready":
            return True
        if model.id not in self._preparing:
            self._preparing.add(model.id)
            self._nursery.start_soon(self._prepare_then_dispatch, model)
        return False

    async def _prepare_then_dispatch(self, model: ModelConfig) -> None:
        try:
            await self.store.prepare(model)
        except LllmsError as error:
            self._fail_waiters(model, error)
        finally:
            self._preparing.discard(model.id)
            self._dispatch()

    def _memory_allows(self, model: ModelConfig, waiter: _Waiter) -> bool:
        """Whether a new instance of ``model`` fits the memory budget now, counting the
        instances still loading or being disposed. If not, room is made (the prompt caches'
        RAM first, then idle instances of other models, least recently used first) and the
        request waits until the disposals are done and their memory is free. It is refused
        when the model could not fit even with every other model and every state in RAM gone,
        or when nothing is left to free and the process itself (after handing its free heap
        back) leaves no room."""
        need = self._estimate(model)
        used = self._memory_used()
        promised = self._room_promised(model)
        if used + need + promised <= self.memory_budget:
            self._keep_promise(model)
            return True
        going = [i for i in self.instances.values() if i.model is not model or i.dispose_requested or i.draining]
        reclaimable = sum(instance.footprint for instance in going) + sum(cache.ram_bytes for cache in self.caches.values())
        loading = any(instance.engine_instance is None for instance in self.instances.values())
        # while a load is in flight the resident memory holds part of it, which ``used`` counts
        # again at its full projected size: decide on a refusal once it is loaded
        if used - reclaimable + need > self.memory_budget and self._count(model) == 0 and not loading:
            self._refuse(waiter, need, used - reclaimable)
            return False
        if promised:
            return False  # room is being made for another model's request, which came first
        self._promise = (model.id, need)
        self._make_room(model, used + need - self.memory_budget, drain=True)
        used = self._memory_used()
        if used + need <= self.memory_budget:  # shrinking the prompt caches was enough
            self._keep_promise(model)
            return True
        if any(i.state != "ready" or i.dispose_requested or i.draining for i in self.instances.values()):
            return False  # each load and disposal dispatches again
        if self._count(model) > 0:
            return False  # its instances serve the request once a slot is free
        # nothing is on its way out: the process itself holds the room (a heap that grew)
        if not self._heap_released:
            if not self._releasing_heap:
                self._releasing_heap = True
                self._nursery.start_soon(self._release_heap_then_dispatch)
            return False
        self._refuse(waiter, need, used)
        return False

    def _refuse(self, waiter: _Waiter, need: int, held: int) -> None:
        self._waiters.remove(waiter)
        waiter.error = ServiceUnavailableError(
            f"model {waiter.model.id!r} needs about {need // MIB} MiB; the server's memory budget is "
            f"{self.memory_budget // MIB} MiB (server.memory_budget_mib), of which {held // MIB} MiB "
            "are taken by the server itself",
            code="memory_budget_exceeded",
        )
        waiter.event.set()

    async def _release_heap_then_dispatch(self) -> None:
        try:
            await trio.to_thread.run_sync(release_free_memory)
        finally:
            self._releasing_heap = False
            self._heap_released = True
            self._dispatch()

    def _keep_promise(self, model: ModelConfig) -> None:
        """The model's load is admitted: the room promised to it is taken."""
        if self._promise is not None and self._promise[0] == model.id:
            self._promise = None

    def _room_promised(self, model: ModelConfig) -> int:
        """Bytes promised to the load of another model that room is being made for, while a
        request for it waits (so that the room made is not taken by another model's load,
        which that model would then have disposed in turn)."""
        if self._promise is None or self._promise[0] == model.id:
            return 0
        model_id, need = self._promise
        waiting = any(waiter.model.id == model_id and waiter.slot is None for waiter in self._waiters)
        if not waiting or not self._can_spawn(self.config.models[model_id]):
            self._promise = None  # its requests were served, left, or wait for the instances it has
            return 0
        return need

    def _make_room(self, model: ModelConfig | None, excess: int, drain: bool = False) -> None:
        """Free ``excess`` bytes (for a new instance of ``model``, or None to keep within the
        budget): what instances already being disposed will free counts; then the prompt
        caches' states leave RAM (see ``_shrink_caches``); then idle instances of other models
        are disposed, least recently used first (their states are saved); with ``drain``,
        then busy ones take no new request and go once idle."""
        others = [instance for instance in self.instances.values() if instance.model is not model]
        excess -= sum(instance.footprint for instance in others if instance.dispose_requested or instance.draining)
        excess -= self._shrink_caches(excess)
        # requests are served in arrival order, so a younger request may not have taken the idle
        # slot waiting for it yet: its instance stays (a nested request passes the concurrency limit)
        limit = self.config.server.concurrency
        gate_open = limit is None or self._processing < limit
        awaited = {waiter.model.id for waiter in self._waiters if gate_open or waiter.nested}
        others = [i for i in others if not (i.model.id in awaited and any(not slot.busy for slot in i.slots))]
        victims = sorted((i for i in others if i.ready and i.idle), key=lambda i: i.last_used)
        if drain:
            victims += sorted((i for i in others if i.ready and not i.idle), key=lambda i: i.last_used)
        for victim in victims:
            if excess <= 0:
                return
            log.info("disposing %s to keep within the memory budget", victim.id, extra={"model": victim.model.id})
            if victim.idle:
                victim.dispose_requested = True
                victim.poke()
            else:
                victim.draining = True
            excess -= victim.footprint

    def _shrink_caches(self, excess: int, keep: PromptCache | None = None) -> int:
        """Drop up to ``excess`` bytes of states from the prompt caches' RAM (all but ``keep``),
        least recently used first: first the caches of models no instance holds (their states
        went to disk when their instances were disposed), then the others. Returns the bytes freed."""
        held = {instance.model.id for instance in self.instances.values()}
        caches = sorted(
            (cache for cache in self.caches.values() if cache is not keep and cache.ram_bytes),
            key=lambda cache: cache.model_id in held,
        )
        freed = 0
        for cache in caches:
            if freed >= excess:
                break
            before = cache.ram_bytes
            cache.trim(max(0, before - (excess - freed)))
            freed += before - cache.ram_bytes
        return freed

    def _fit_memory(self) -> None:
        """Keep within the budget after a request (an estimate fell short, a prompt cache
        grew): the caches' least recently used states leave RAM, then idle instances go."""
        self._heap_released = False
        excess = self._memory_used() - self.memory_budget
        if excess > 0:
            self._make_room(None, excess)
        self._bound_caches()

    def _bound_caches(self, only: PromptCache | None = None) -> None:
        """Let the prompt caches of the models with instances (or ``only`` that one) grow
        (engines save states into them) only into the room the budget leaves now, shared
        between them; the others hold what they hold."""
        room = max(0, self.memory_budget - self._memory_used())
        live = {instance.model.id for instance in self.instances.values()}
        growing = [only] if only is not None else [cache for model_id, cache in self.caches.items() if model_id in live]
        for cache in self.caches.values():
            cache.ram_ceiling = cache.ram_bytes + (room // len(growing) if cache in growing else 0)

    def _room_for_states(self, instance: Instance) -> None:
        """Before a leaving instance's states are saved into its prompt cache's RAM (while the
        instance still holds its memory): the other caches shrink so that the cache can grow
        to its bound within the budget."""
        cache = instance.prompt_cache
        if cache is None or instance.engine_instance is None:
            return
        growth = min(instance.footprint, max(0, cache.ram_limit - cache.ram_bytes))
        excess = self._memory_used() + growth - self.memory_budget
        if excess > 0:
            self._shrink_caches(excess, keep=cache)
        self._bound_caches(only=cache)

    def _count(self, model: ModelConfig) -> int:
        return sum(1 for i in self.instances.values() if i.model is model and not i.dispose_requested)

    def _can_spawn(self, model: ModelConfig) -> bool:
        if self._count(model) >= model.max_instances:
            return False
        return not (model.device.requires_gpu and self._gpu_holder is not None)

    def _make_room_on_gpu(self, model: ModelConfig) -> None:
        """A model that must run on the GPU waits for it: the holder of another model is
        disposed as soon as it is idle."""
        holder = self._gpu_holder
        if not model.device.requires_gpu or holder is None or holder.model is model:
            return
        if self._count(model) >= model.max_instances:
            return
        if holder.ready and holder.idle:
            log.info("disposing %s to free the GPU for model %r", holder.id, model.id)
            holder.dispose_requested = True
            holder.poke()

    # --- instances ------------------------------------------------------------

    def _spawn(self, model: ModelConfig) -> trio.Event:
        """Start an instance of ``model``; the returned event is set once it is loaded (or failed)."""
        engine = self.engines[model.engine]
        device = self._device(model, engine)
        instance = Instance(model, engine, device, self._estimate(model), self.caches.get(model.id))
        self.instances[instance.id] = instance
        self._bound_caches()  # what the new instance will take is no longer room for states
        if device.gpu:
            self._gpu_holder = instance
        loaded = trio.Event()
        self._nursery.start_soon(self._start_instance, instance, loaded)
        return loaded

    def _device(self, model: ModelConfig, engine: Engine) -> Device:
        """Where a new instance of ``model`` would run now."""
        use_gpu = model.device.requires_gpu or (
            model.device.gpu == "auto" and self._gpu_holder is None and self._gpu_usable.get(model.engine, False)
        )
        return Device(
            gpu=use_gpu,
            name=model.device.gpu if isinstance(model.device.gpu, str) and model.device.gpu != "auto" else None,
            gpu_layers=model.device.gpu_layers,
            cpu_threads=model.device.cpu_threads,
            mem_lock=model.device.mem_lock,
            memory_budget=self.memory_budget,
        )

    async def _start_instance(self, instance: Instance, loaded: trio.Event) -> None:
        try:
            await self._nursery.start(self._run_instance, instance)
        finally:
            loaded.set()

    async def _run_instance(self, instance: Instance, task_status=trio.TASK_STATUS_IGNORED) -> None:
        model, engine = instance.model, instance.engine
        log.info("loading %s on %s", instance.id, "gpu" if instance.device.gpu else "cpu")
        try:
            prepared = await self.store.prepare(model)
            engine_instance = await engine.create_instance(model, prepared, instance.device)
        except Exception as exception:
            error = exception if isinstance(exception, LllmsError) else ModelLoadError(
                f"model {model.id!r} failed to load: {type(exception).__name__}: {exception}"
            )
            log.error("loading %s failed: %s", instance.id, error.message)
            if model.min_instances:
                self._start_errors[model.id] = error.message
            self._forget(instance)
            self._fail_waiters(model, error)
            self._refill(model, failed=True)
            self._dispatch()
            task_status.started()
            return
        try:
            instance.engine_instance = engine_instance
            instance.slots = [Slot(instance, index) for index in range(engine_instance.slots)]
            self._slots_seen[model.id] = len(instance.slots)
            self._footprint_seen[model.id] = instance.footprint
            excess = self._memory_used() - self.memory_budget
            if excess > 0:  # the engine's estimate was short
                self._make_room(model, excess)
            await self._attach_disk_tier(instance)
            await self._preload(instance)
            instance.state = "ready"
            instance.last_used = trio.current_time()  # not the least recently used before its first request
            self._measure_baseline()
            self._bound_caches()
            self._retry_delay.pop(model.id, None)
            self._start_errors.pop(model.id, None)
            log.info("loaded %s (%d slots)", instance.id, len(instance.slots))
            task_status.started()
            self._dispatch()
            await self._live(instance)
        finally:
            instance.state = "disposing"
            instance.dispose_requested = True
            with trio.CancelScope(shield=True):
                self._room_for_states(instance)
                await self._save_states(instance)
                try:
                    await engine.dispose_instance(engine_instance)
                    await trio.to_thread.run_sync(release_free_memory)
                except Exception:
                    log.exception("disposing %s failed", instance.id)
            log.info("disposed %s", instance.id)
            self._forget(instance)
            self._measure_baseline()
            self._bound_caches()
            self._refill(model)
            self._dispatch()

    async def _attach_disk_tier(self, instance: Instance) -> None:
        """Start the disk tier of the model's prompt cache for this instance's kind of states."""
        cache = instance.prompt_cache
        if cache is None:
            return
        try:
            signature = await instance.engine.state_signature(instance.model, instance.engine_instance)
            if signature is not None:
                await trio.to_thread.run_sync(cache.attach, signature)
        except Exception:
            log.exception("the prompt cache of %s has no disk tier", instance.id)

    async def _save_states(self, instance: Instance) -> None:
        """Before disposal: every slot's state into the prompt cache, and the cache's states to disk."""
        cache = instance.prompt_cache
        if cache is None or instance.engine_instance is None:
            return
        try:
            keys = [slot.context_key for slot in instance.slots]
            await instance.engine.save_states(instance.engine_instance, cache, keys)
            written = await trio.to_thread.run_sync(cache.persist)
            if written:
                log.info("saved %d states of %s to disk", written, instance.id, extra={"model": instance.model.id})
        except Exception:
            log.exception("saving the states of %s failed", instance.id)

    async def _preload(self, instance: Instance) -> None:
        from lllms_core.context import chat_key, text_key
        from lllms_core.schemas import AssistantMessage, SystemMessage, UserMessage

        model = instance.model
        if not (model.initial_messages or model.prefix):
            return
        slot = instance.slots[0]
        try:
            await instance.engine.preload(slot.task_context())
        except Exception as error:
            log.warning("preloading %s failed, continuing without: %s", instance.id, error)
            return
        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        if model.initial_messages:
            slot.context_key = chat_key(kinds[m.role](content=m.content) for m in model.initial_messages)
        else:
            slot.context_key = text_key(model.prefix or "")
        slot.fresh = False

    async def _live(self, instance: Instance) -> None:
        """Keep the instance until disposal is asked for, or its TTL runs out while idle."""
        model = instance.model
        while not instance.dispose_requested:
            deadline = math.inf
            if instance.idle and self._count(model) > model.min_instances:
                deadline = instance.last_used + (model.ttl if instance.keep_alive is None else instance.keep_alive)
            instance.wake = trio.Event()
            with trio.move_on_at(deadline):
                await instance.wake.wait()
                continue
            if instance.idle and self._count(model) > model.min_instances:
                log.info("%s idle for %ss, disposing", instance.id, model.ttl if instance.keep_alive is None else instance.keep_alive)
                return

    def _forget(self, instance: Instance) -> None:
        self.instances.pop(instance.id, None)
        if self._gpu_holder is instance:
            self._gpu_holder = None

    def _fail_waiters(self, model: ModelConfig, error: LllmsError) -> None:
        if any(i.model is model for i in self.instances.values()):
            return  # another instance of the model may still serve them
        for waiter in [w for w in self._waiters if w.model is model]:
            self._waiters.remove(waiter)
            waiter.error = error
            waiter.event.set()

    def _refill(self, model: ModelConfig, failed: bool = False) -> None:
        if self.closed or self._count(model) >= model.min_instances:
            return
        if not failed:
            for _ in range(model.min_instances - self._count(model)):
                self._spawn(model)
            return
        first, longest = RETRY_MIN_INSTANCES_AFTER
        delay = self._retry_delay.get(model.id, first)
        self._retry_delay[model.id] = min(delay * 2, longest)
        self._nursery.start_soon(self._refill_later, model, delay)

    async def _refill_later(self, model: ModelConfig, delay: float) -> None:
        await trio.sleep(delay)
        self._refill(model)


@asynccontextmanager
async def open_model_pool(config: Config, engines: dict[str, Engine], store) -> AsyncIterator[ModelPool]:
    """Run a pool: its instances live while the block runs and are disposed when it ends."""
    async with trio.open_nursery() as nursery:
        pool = ModelPool(config, engines, store, nursery)
        await pool._probe_gpus()
        pool._start()
        try:
            yield pool
        finally:
            pool._close()
            nursery.cancel_scope.cancel()
