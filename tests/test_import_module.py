"""An engine's heavy library is imported in a worker thread: the event loop keeps serving."""

from __future__ import annotations

import sys
import uuid

import trio

from lllms_core.plugin_api import import_module


async def test_a_slow_first_import_does_not_stall_the_event_loop(tmp_path, monkeypatch):
    name = f"slow_backend_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text("import time\ntime.sleep(0.5)  # a library that takes long to import\nVALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        module = await import_module(name)
        nursery.cancel_scope.cancel()
    assert module.VALUE == 42 and sys.modules[name] is module
    # imported on the loop's own thread, the ticker would not have run at all meanwhile
    assert ticks >= 10, f"the event loop ticked {ticks} times during a 0.5 s import"
    assert await import_module(name) is module, "imported once"
