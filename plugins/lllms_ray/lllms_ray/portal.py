"""trio beside the asyncio loop of a Ray Serve replica, and calls both ways.

A replica's methods run on an asyncio loop; lllms' core is trio. A :class:`TrioPortal`
runs trio in guest mode on that loop (:func:`trio.lowlevel.start_guest_run`): both
share one thread, so a call across costs a callback on the loop, not a thread switch.
(Measured against trio in a thread of its own, streaming through a replica and the
ingress cost the same CPU per token; one thread is simpler. Calls across still go through
``call_soon_threadsafe`` and ``run_sync_soon``, which guest mode needs from callbacks.)

- asyncio → trio: ``await portal.run(trio_fn, *args)``; ``await portal.start_soon(trio_fn, *args)``
  for a service (``nursery.start``); ``portal.stream(trio_fn, *args)``
  is an async iterator of batches of what ``trio_fn(push, *args)`` pushes. Cancelling the
  asyncio side cancels the trio task.
- trio → asyncio: ``await portal.run_asyncio(coroutine_fn, *args)``;
  ``portal.relay(async_iterable_fn, *args)`` is a trio async iterator of what the asyncio
  iterable yields. Cancelling the trio side cancels the asyncio task.
"""

from __future__ import annotations

import asyncio
import math
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import trio


class _End:
    """What ends a stream: nothing more (``error`` None) or a failure."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class TrioPortal:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self.finished = loop.create_future()
        """Done once trio has stopped; its exception, if trio failed."""

    @classmethod
    async def start(cls) -> "TrioPortal":
        """Start trio in guest mode on the running asyncio loop."""
        loop = asyncio.get_running_loop()
        portal = cls(loop)
        started = loop.create_future()
        trio.lowlevel.start_guest_run(
            portal._main,
            started,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=lambda outcome: loop.call_soon_threadsafe(portal._done, outcome),
            host_uses_signal_set_wakeup_fd=False,
        )
        await started
        return portal

    async def _main(self, started: asyncio.Future) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.loop.call_soon_threadsafe(started.set_result, None)
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def _done(self, outcome) -> None:
        try:
            outcome.unwrap()
        except BaseException as error:
            self.finished.set_exception(error)
        else:
            self.finished.set_result(None)

    @property
    def alive(self) -> bool:
        return not self.finished.done()

    def failure(self) -> str:
        """Why trio stopped, in a few words."""
        if not self.finished.done():
            return "running"
        if self.finished.cancelled() or self.finished.exception() is None:
            return "stopped"
        error = self.finished.exception()
        return f"{type(error).__name__}: {error}"

    async def stop(self) -> None:
        """Cancel every trio task and wait until trio has stopped."""
        if self.alive and self._stop is not None:
            self.token.run_sync_soon(self._stop.set)
            await asyncio.shield(self.finished)

    # --- asyncio → trio ---------------------------------------------------------

    async def run(self, trio_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``trio_fn(*args)`` in trio; its result, or its exception. Cancelled
        here, the trio task is cancelled and this returns once it has ended."""
        if not self.alive:
            raise RuntimeError("trio has stopped")
        result = self.loop.create_future()
        scope = trio.CancelScope()
        self.token.run_sync_soon(self._nursery.start_soon, self._call, trio_fn, args, result, scope)
        try:
            return await asyncio.shield(result)
        except asyncio.CancelledError:
            if not result.done():
                self.token.run_sync_soon(scope.cancel)
                await asyncio.wait([result])
            raise

    async def _call(self, trio_fn, args, result: asyncio.Future, scope: trio.CancelScope) -> None:
        def settle(setter, *value) -> None:
            def apply() -> None:
                if not result.done():
                    setter(*value)

            self.loop.call_soon_threadsafe(apply)

        try:
            with scope:
                value = await trio_fn(*args)
                settle(result.set_result, value)
                return
            settle(result.cancel)
        except Exception as error:
            settle(result.set_exception, error)
        except BaseException:
            settle(result.cancel)
            raise

    async def start_soon(self, trio_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Start ``trio_fn(*args, task_status=...)`` as ``nursery.start`` does: return what
        it passes to ``task_status.started`` (raise what it raises before); it then runs on
        until the portal stops, and a failure then stops the portal."""
        return await self.run(self._start, trio_fn, args)

    async def _start(self, trio_fn, args) -> Any:
        return await self._nursery.start(trio_fn, *args)

    async def stream(self, trio_fn: Callable[..., Awaitable[None]], *args: Any) -> AsyncIterator[list[Any]]:
        """What ``trio_fn(push, *args)`` pushes, in batches: every item pushed since the
        last batch was taken. An exception of ``trio_fn`` is raised after the last batch."""
        items: asyncio.Queue = asyncio.Queue()

        def push(item: Any) -> None:
            self.loop.call_soon_threadsafe(items.put_nowait, item)

        async def produce() -> None:
            try:
                await trio_fn(push, *args)
            except Exception as error:
                push(_End(error))
            else:
                push(_End())

        def ended(producer: asyncio.Future) -> None:
            # produce() ends the stream itself, unless trio could not run it at all
            if producer.cancelled():
                items.put_nowait(_End(RuntimeError("trio stopped")))
            elif producer.exception() is not None:
                items.put_nowait(_End(producer.exception()))

        producer = asyncio.ensure_future(self.run(produce))
        producer.add_done_callback(ended)
        try:
            while True:
                batch = [await items.get()]
                while not items.empty():
                    batch.append(items.get_nowait())
                if isinstance(batch[-1], _End):
                    if batch[:-1]:
                        yield batch[:-1]
                    if batch[-1].error is not None:
                        raise batch[-1].error
                    return
                yield batch
        finally:
            producer.cancel()
            await asyncio.wait([producer])

    # --- trio → asyncio ---------------------------------------------------------

    async def run_asyncio(self, coroutine_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``coroutine_fn(*args)`` as an asyncio task; cancelled here, the task is
        cancelled and this returns once it has ended."""
        task = asyncio.run_coroutine_threadsafe(coroutine_fn(*args), self.loop)
        done = trio.Event()
        task.add_done_callback(lambda _: self.token.run_sync_soon(done.set))
        try:
            await done.wait()
        except trio.Cancelled:
            task.cancel()
            with trio.CancelScope(shield=True):
                await done.wait()
            raise
        return task.result()

    @asynccontextmanager
    async def relay(self, iterable_fn: Callable[..., Any], *args: Any) -> AsyncIterator[trio.MemoryReceiveChannel]:
        """A trio channel of what ``iterable_fn(*args)`` (an asyncio async iterable) yields;
        its exception is raised from the channel's iteration. Leaving the block cancels it."""
        send, receive = trio.open_memory_channel(math.inf)

        def push(item: Any) -> None:
            self.token.run_sync_soon(send.send_nowait, item)

        async def pump() -> None:
            try:
                async for item in iterable_fn(*args):
                    push(item)
            except Exception as error:
                push(_End(error))
            else:
                push(_End())

        task = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        done = trio.Event()
        task.add_done_callback(lambda _: self.token.run_sync_soon(done.set))
        try:
            yield _Items(receive)
        finally:
            task.cancel()
            with trio.CancelScope(shield=True):
                await done.wait()


class _Items:
    """The receiving side of :meth:`TrioPortal.relay`."""

    def __init__(self, receive: trio.MemoryReceiveChannel):
        self._receive = receive
        self._ended = False

    def __aiter__(self) -> "_Items":
        return self

    async def __anext__(self) -> Any:
        if self._ended:
            raise StopAsyncIteration
        item = await self._receive.receive()
        if isinstance(item, _End):
            self._ended = True
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item
