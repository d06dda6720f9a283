"""The pool's rules, driven through the ModelServer facade with the fake engine."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from lllms_core.errors import ModelLoadError, QueueFullError, RequestTimeoutError
from lllms_core.machine import MIB
from lllms_core.server import ModelServer
from lllms_core.testing.fake import EVENTS, FakeEngine

pytestmark = pytest.mark.timeout(30)


def config(server=None, **models):
    return {"server": server or {}, "models": {name: {"engine": "fake", **spec} for name, spec in models.items()}}


def chat(model, *turns, **params):
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
    return {"model": model, "messages": messages, **params}


@pytest.fixture(autouse=True)
def clear_events():
    EVENTS.clear()


def tasks(model=None):
    return [event for event in EVENTS if event[0] == "task" and (model is None or event[1] == model)]


async def most_while(measure, job, *arguments) -> int:
    """The highest value ``measure()`` took while ``job(argument)`` ran for each argument at once."""
    most = 0

    async def watch():
        nonlocal most
        while True:
            most = max(most, measure())
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        async with trio.open_nursery() as jobs:
            for argument in arguments:
                jobs.start_soon(job, argument)
        nursery.cancel_scope.cancel()
    return most


async def wait_until(predicate, timeout=5.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_concurrency_gate_processes_one_request_at_a_time():
    spec = {"token_delay": 0.02, "reply": "one two three four"}
    async with ModelServer(config({"concurrency": 1}, a=spec, b=spec)) as server:
        spans = {}

        async def run(model):
            async with server.stream_chat_completion(chat(model, "hi")) as stream:
                first = None
                async for _ in stream:
                    first = first or trio.current_time()
                spans[model] = (first, trio.current_time())

        most = await most_while(lambda: server.status()["processing"], run, "a", "b")
    (a_start, a_end), (b_start, b_end) = spans["a"], spans["b"]
    assert most == 1
    assert a_end <= b_start or b_end <= a_start, "two requests ran at once despite concurrency = 1"


async def test_waiting_requests_are_served_first_come_first_served():
    async with ModelServer(config(a={"token_delay": 0.02, "reply": "a b c d e"})) as server:
        finished = []

        async def run(name):
            await server.chat_completion(chat("a", name))
            finished.append(name)

        def in_pool():
            return server.status()["processing"] + server.status()["queued"]

        async with trio.open_nursery() as nursery:
            for started, name in enumerate(["first", "second", "third", "fourth"], start=1):
                nursery.start_soon(run, name)
                await wait_until(lambda: in_pool() + len(finished) == started)
    assert finished == ["first", "second", "third", "fourth"]


async def test_a_follow_up_turn_goes_to_the_slot_holding_its_conversation():
    async with ModelServer(config(m={"slots": 2, "reply": "noted"})) as server:
        await server.chat_completion(chat("m", "my cat is called Tom"))
        await server.chat_completion(chat("m", "my dog is called Rex"))
        (_, _, slot_a, _), (_, _, slot_b, _) = tasks()
        assert slot_a != slot_b, "a new conversation should take the empty slot, not evict the first"
        second_a = await server.chat_completion(chat("m", "my cat is called Tom", "noted", "what is my cat called?"))
        second_b = await server.chat_completion(chat("m", "my dog is called Rex", "noted", "and my dog?"))
    assert tasks()[2][2] == slot_a and tasks()[3][2] == slot_b
    # the fake engine counts the words its slot already held: the whole first turn
    assert second_a.usage.cached_tokens == len("my cat is called Tom noted".split())
    assert second_b.usage.cached_tokens == len("my dog is called Rex noted".split())


async def test_least_recently_used_slot_is_reset_when_all_hold_other_conversations():
    async with ModelServer(config(m={"slots": 2, "reply": "ok"})) as server:
        await server.chat_completion(chat("m", "apples"))
        await server.chat_completion(chat("m", "bananas"))
        third = await server.chat_completion(chat("m", "cherries"))
        follow_up_b = await server.chat_completion(chat("m", "bananas", "ok", "more"))
    slot_a, slot_b, slot_c = (event[2] for event in tasks()[:3])
    assert slot_c == slot_a, "the least recently used slot (A's) is the one reset"
    assert tasks()[2][3] is True, "the engine is told the slot was reset"
    assert third.usage.cached_tokens == 0
    assert follow_up_b.usage.cached_tokens == 2, "B's slot kept its context"


async def test_idle_instance_is_disposed_when_its_ttl_runs_out():
    async with ModelServer(config(m={"reply": "ok"}, z={"reply": "ok"})) as server:
        server.config.models["m"].ttl = 0.3
        server.config.models["z"].ttl = 0
        await server.chat_completion(chat("m", "hello"))
        await server.chat_completion(chat("z", "hello"))
        await wait_until(lambda: ("dispose", "z") in EVENTS, timeout=1)
        assert ("dispose", "m") not in EVENTS, "ttl 0.3 s: still alive right after the request"
        await wait_until(lambda: ("dispose", "m") in EVENTS, timeout=3)
        await wait_until(lambda: server.status()["instances"] == [], timeout=1)  # its memory handed back (malloc_trim)


async def test_min_instances_are_loaded_at_start_and_refilled_after_a_failed_load():
    async with ModelServer(config(m={"min_instances": 1, "fail_loads": 1, "ttl": 0})) as server:
        assert EVENTS[0] == ("load-failed", "m")
        await wait_until(lambda: any(i["state"] == "idle" for i in server.status()["instances"]), timeout=5)
        await server.chat_completion(chat("m", "hello"))
        await trio.sleep(0.1)
        assert [i["model"] for i in server.status()["instances"]] == ["m"], "ttl 0 never goes below min_instances"


async def test_a_full_queue_refuses_new_requests():
    async with ModelServer(config({"max_queue": 1}, m={"token_delay": 0.05, "reply": "a b c d e f"})) as server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.chat_completion, chat("m", "one"))
            await wait_until(lambda: server.status()["processing"] == 1)
            nursery.start_soon(server.chat_completion, chat("m", "two"))
            await wait_until(lambda: server.status()["queued"] == 1)
            with pytest.raises(QueueFullError) as refused:
                await server.chat_completion(chat("m", "three"))
            assert refused.value.status == 429
    assert len(tasks()) == 2


async def test_cancelling_a_waiting_request_frees_its_place():
    async with ModelServer(config(m={"token_delay": 0.05, "reply": "a b c d"})) as server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.chat_completion, chat("m", "running"))
            await wait_until(lambda: server.status()["processing"] == 1)
            with trio.move_on_after(0.05):
                await server.chat_completion(chat("m", "gives up while waiting"))
            assert server.status()["queued"] == 0
        later = await server.chat_completion(chat("m", "later"))
    assert later.choices[0].text == "a b c d"
    assert [event[0] for event in tasks()] == ["task", "task"], "the cancelled request never ran"


async def test_cancelling_a_running_request_stops_generation_and_frees_the_slot():
    words = " ".join(f"w{i}" for i in range(100))
    async with ModelServer(config(m={"token_delay": 0.02, "reply": words})) as server:
        received = []
        with trio.move_on_after(2):
            async with server.stream_chat_completion(chat("m", "long one")) as stream:
                async for chunk in stream:
                    received.append(chunk.text)
                    if len(received) == 3:
                        break
        await wait_until(lambda: server.status()["processing"] == 0, timeout=1)
        state = server.pool.instances and next(iter(server.pool.instances.values())).engine_instance.slot_states[0]
        after = await server.chat_completion(chat("m", "next"))
    assert len(received) == 3
    assert after.choices[0].finish_reason == "stop"
    assert state != words.split(), "generation stopped early"


async def test_a_request_timeout_stops_it_and_frees_the_slot():
    async with ModelServer(config({"request_timeout": 0.2}, m={"token_delay": 0.05, "reply": "a " * 50})) as server:
        with pytest.raises(RequestTimeoutError):
            await server.chat_completion(chat("m", "slow"))
        assert server.status()["processing"] == 0
        server.config.server.request_timeout = None
        server.config.models["m"].options.reply = "quick"
        assert (await server.chat_completion(chat("m", "fast"))).choices[0].text == "quick"


async def test_a_failing_load_reaches_the_waiting_requests_and_the_next_request_retries():
    async with ModelServer(config(m={"fail_loads": 2, "load_delay": 0.1})) as server:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                errors = []

                async def run():
                    try:
                        await server.chat_completion(chat("m", "hello"))
                    except ModelLoadError as error:
                        errors.append(error)

                for _ in range(3):
                    nursery.start_soon(run)
        assert len(errors) == 3, "every waiting request gets the load error"
        assert server.status()["instances"] == [], "a failed instance is not kept"
        with pytest.raises(ModelLoadError):
            await server.chat_completion(chat("m", "again"))
        answer = await server.chat_completion(chat("m", "third time"))
    assert answer.choices[0].text == "You said: third time"
    assert [e[0] for e in EVENTS if e[0].startswith("load")] == ["load-failed", "load-failed", "load"]


async def test_only_one_instance_holds_the_gpu():
    gpu = {"device": {"gpu": True}, "reply": "ok"}
    async with ModelServer(config(a=gpu, b=gpu, c={"device": {"gpu": "auto"}}, d={"device": {"gpu": False}})) as server:
        await server.chat_completion(chat("a", "hi"))
        await server.chat_completion(chat("c", "hi"))
        await server.chat_completion(chat("b", "hi"))
        await server.chat_completion(chat("d", "hi"))
        devices = {i["model"]: i["device"] for i in server.status()["instances"]}
    loads = [e for e in EVENTS if e[0] in ("load", "dispose")]
    assert loads[:4] == [("load", "a", "gpu"), ("load", "c", "cpu"), ("dispose", "a"), ("load", "b", "gpu")]
    assert devices == {"b": "gpu", "c": "cpu", "d": "cpu"}


async def test_initial_messages_are_preloaded_and_reused():
    system = {"role": "system", "content": "You are a terse pirate"}
    async with ModelServer(config(m={"initial_messages": [system], "min_instances": 1, "reply": "arr"})) as server:
        answer = await server.chat_completion({"model": "m", "messages": [system, {"role": "user", "content": "hi"}]})
    assert answer.usage.cached_tokens == len(system["content"].split())


def budget_for(models_mib: int) -> int:
    """A memory budget (MiB) with room for ``models_mib`` beside what the test process holds."""
    from lllms_core.machine import MIB, process_rss

    return process_rss() // MIB + 256 + models_mib


async def test_the_memory_budget_disposes_the_least_recently_used_idle_model_to_admit_another():
    big = {"memory_mib": 10_000, "reply": "ok"}
    async with ModelServer(config({"memory_budget_mib": budget_for(25_000)}, a=big, b=big, c=big)) as server:
        await server.chat_completion(chat("a", "hello"))
        await server.chat_completion(chat("b", "hello"))
        await server.chat_completion(chat("a", "again"))  # b is now the least recently used
        assert not [event for event in EVENTS if event[0] == "dispose"], "two models fit"
        await server.chat_completion(chat("c", "hello"))
        loaded = sorted(instance["model"] for instance in server.status()["instances"])
        memory = server.status()["memory"]
    assert [event for event in EVENTS if event[0] == "dispose"][0] == ("dispose", "b")
    assert loaded == ["a", "c"]
    assert memory["used_bytes"] <= memory["budget_bytes"]


async def test_a_server_over_its_memory_budget_keeps_answering_and_lets_its_idle_models_go():
    small = {"memory_mib": 100, "reply": "ok"}
    async with ModelServer(config({"memory_budget_mib": budget_for(1_000)}, a=small, b=small)) as server:
        await server.chat_completion(chat("a", "hello"))
        await server.chat_completion(chat("b", "hello"))
        server.pool.memory_budget = MIB  # the process outgrew its budget (a heap that grew, a library)
        answer = await server.chat_completion(chat("a", "again"))
        with trio.fail_after(10):
            while server.status()["instances"]:
                await trio.sleep(0.05)
    assert answer.choices[0].text == "ok"
    assert {event[1] for event in EVENTS if event[0] == "dispose"} == {"a", "b"}


async def test_a_model_that_cannot_fit_the_memory_budget_is_refused_with_a_503():
    from lllms_core.errors import ServiceUnavailableError

    budget = budget_for(1_000)
    async with ModelServer(config({"memory_budget_mib": budget}, huge={"memory_mib": 5_000}, small={"memory_mib": 100})) as server:
        await server.chat_completion(chat("small", "hello"))
        with pytest.raises(ServiceUnavailableError) as refused:
            await server.chat_completion(chat("huge", "hello"))
        assert any(event[:2] == ("load", "small") for event in EVENTS) and not any(event[:2] == ("load", "huge") for event in EVENTS)
    assert refused.value.status == 503 and refused.value.code == "memory_budget_exceeded"
    assert "5000 MiB" in refused.value.message and f"memory budget is {budget} MiB" in refused.value.message


def resident_like_a_server(monkeypatch, pool, beyond_mib: int) -> None:
    """Let the pool read the process's resident memory as a real server's: the test process,
    ``beyond_mib`` held beyond what the pool accounts for (a library an engine loaded, as
    torch), and what each fake instance reports holding, from the end of its load until its
    disposal is done (a fake instance holds nothing really)."""
    import lllms_core.pool

    measured = lllms_core.pool.process_rss

    def resident() -> int:
        instances = pool.instances.values()
        held = sum(i.engine_instance.memory_bytes for i in instances if i.engine_instance is not None)
        return measured() + beyond_mib * MIB + held

    monkeypatch.setattr(lllms_core.pool, "process_rss", resident)


async def test_two_models_requested_at_once_that_do_not_fit_together_never_load_at_the_same_time(monkeypatch):
    spec = {"memory_mib": 500, "load_delay": 0.3, "reply": "ok"}
    async with ModelServer(config({"memory_budget_mib": budget_for(1_650)}, a=spec, b=spec)) as server:
        # one model fits beside the 1,000 MiB the server holds beyond its accounting, two do not
        resident_like_a_server(monkeypatch, server.pool, beyond_mib=1_000)
        answers = {}

        async def ask(model):
            answers[model] = (await server.chat_completion(chat(model, "hello"))).choices[0].text

        most = await most_while(lambda: len(server.status()["instances"]), ask, "a", "b")
        order = [event[:2] for event in EVENTS if event[0] in ("load", "dispose")]
    assert answers == {"a": "ok", "b": "ok"}
    assert most == 1, "both models were loading or loaded at once"
    assert order in ([("load", "a"), ("dispose", "a"), ("load", "b")], [("load", "b"), ("dispose", "b"), ("load", "a")])


async def test_a_load_waits_until_the_disposal_that_makes_room_for_it_is_done():
    a = {"memory_mib": 10_000, "dispose_delay": 0.5, "reply": "ok"}
    b = {"memory_mib": 10_000, "reply": "ok"}
    async with ModelServer(config({"memory_budget_mib": budget_for(15_000)}, a=a, b=b)) as server:
        await server.chat_completion(chat("a", "hello"))
        answer = await server.chat_completion(chat("b", "hello"))
        order = [event[:2] for event in EVENTS if event[0] in ("load", "dispose", "disposed")]
    assert answer.choices[0].text == "ok"
    assert order == [("load", "a"), ("dispose", "a"), ("disposed", "a"), ("load", "b")]


async def test_the_room_made_for_a_model_goes_to_its_load_not_to_a_model_that_was_waiting_for_a_slot():
    a = {"memory_mib": 10_000, "token_delay": 0.05, "reply": "one two three four five six"}
    b = {"memory_mib": 10_000, "reply": "ok"}
    async with ModelServer(config({"memory_budget_mib": budget_for(15_000)}, a=a, b=b)) as server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.chat_completion, chat("a", "first"))
            await wait_until(lambda: server.status()["processing"] == 1)
            nursery.start_soon(server.chat_completion, chat("a", "second"))  # waits for a's one slot
            await wait_until(lambda: server.status()["queued"] == 1)
            nursery.start_soon(server.chat_completion, chat("b", "hello"))  # a goes once idle, to make room for b
        order = [event[:2] for event in EVENTS if event[0] in ("load", "dispose")]
    # not a disposed, loaded again for its second request, and disposed again for b
    assert order == [("load", "a"), ("dispose", "a"), ("load", "b"), ("dispose", "b"), ("load", "a")]

async def test_a_model_the_process_itself_leaves_no_room_for_is_refused_and_other_models_are_served(monkeypatch):
    from lllms_core.errors import ServiceUnavailableError

    models = {"a": {"memory_mib": 1_000}, "b": {"memory_mib": 100, "reply": "ok"}}
    async with ModelServer(config({"memory_budget_mib": budget_for(1_250), "prompt_cache_mib": 1_000}, **models)) as server:
        for state in range(16):  # 800 MiB of states: room enough for a, one would think
            server.pool.caches["a"].put(list(range(state * 100, state * 100 + 64)), b"state", 50 * MIB)
        # the process holds 600 MiB more than it accounts for, and dropping states does not shrink it
        resident_like_a_server(monkeypatch, server.pool, beyond_mib=600)
        results = {}

        async def ask(model):
            try:
                results[model] = (await server.chat_completion(chat(model, "hello"))).choices[0].text
            except ServiceUnavailableError as error:
                results[model] = error.code

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, "a")
                await wait_until(lambda: "a" in results or server.status()["queued"] == 1)
                nursery.start_soon(ask, "b")
    assert results == {"a": "memory_budget_exceeded", "b": "ok"}

async def test_states_leave_ram_before_an_idle_model_is_disposed_to_admit_another():
    spec = {"memory_mib": 1_000, "reply": "ok"}
    server_config = config({"memory_budget_mib": budget_for(2_500), "prompt_cache_mib": 2_000}, a=spec, b=spec)
    async with ModelServer(server_config) as server:
        await server.chat_completion(chat("a", "hello"))
        cache = server.pool.caches["a"]
        older, newer = list(range(64)), list(range(100, 164))
        cache.put(older, b"state", 400 * MIB)
        cache.put(newer, b"state", 400 * MIB)
        await server.chat_completion(chat("b", "hello"))  # 1,000 MiB more: one state must go
        loaded = sorted(instance["model"] for instance in server.status()["instances"])
        kept = [cache.lookup(older) is not None, cache.lookup(newer) is not None]
        disposed = [event for event in EVENTS if event[0] == "dispose"]
    assert loaded == ["a", "b"] and not disposed
    assert kept == [False, True], "the least recently used state leaves RAM"


async def test_a_model_whose_own_states_in_ram_stand_in_its_way_is_admitted_not_refused():
    spec = {"memory_mib": 1_000, "reply": "ok"}
    async with ModelServer(config({"memory_budget_mib": budget_for(1_500), "prompt_cache_mib": 2_000}, a=spec)) as server:
        server.pool.caches["a"].put(list(range(64)), b"state", 800 * MIB)  # states of an earlier instance
        answer = await server.chat_completion(chat("a", "hello"))
        memory = server.status()["memory"]
    assert answer.choices[0].text == "ok"
    assert memory["used_bytes"] <= memory["budget_bytes"]


async def test_a_prompt_cache_grows_only_into_the_room_the_memory_budget_leaves():
    spec = {"memory_mib": 1_000, "reply": "ok"}
    async with ModelServer(config({"memory_budget_mib": budget_for(1_500), "prompt_cache_mib": 2_000}, a=spec)) as server:
        await server.chat_completion(chat("a", "hello"))  # about 750 MiB left for states
        cache = server.pool.caches["a"]
        first, second, third = list(range(64)), list(range(100, 164)), list(range(200, 264))
        kept = [cache.put(first, b"state", 500 * MIB), cache.put(second, b"state", 500 * MIB), cache.put(third, b"state", 900 * MIB)]
        held = [cache.lookup(first) is not None, cache.lookup(second) is not None]
        memory = server.status()["memory"]
    assert kept == [True, True, False], "a state bigger than the room left is not kept"
    assert held == [False, True], "the older state made room for the newer"
    assert memory["used_bytes"] <= memory["budget_bytes"]


def save_state_of(server, request: dict, first_token: int = 0) -> None:
    """Put a state of the conversation ``request`` continues into its model's prompt cache,
    as an engine would have saved it (the fake engine saves none itself)."""
    import msgspec

    from lllms_core.context import chat_key
    from lllms_core.schemas import ChatCompletionRequest

    key = chat_key(msgspec.convert(request, ChatCompletionRequest).messages[:-1])
    server.pool.caches[request["model"]].put(list(range(first_token, first_token + 64)), b"state", 5, key)


async def test_a_conversation_in_the_prompt_cache_takes_the_least_recently_used_slot_rather_than_a_new_instance():
    async with ModelServer(config(m={"slots": 2, "max_instances": 2, "reply": "ok"})) as server:
        await server.chat_completion(chat("m", "apples"))
        await server.chat_completion(chat("m", "bananas"))
        follow_up = chat("m", "cherries", "ok", "more")
        save_state_of(server, follow_up)
        await server.chat_completion(follow_up)
        instances = server.status()["instances"]
        await server.chat_completion(chat("m", "dates"))  # nothing saved: a new instance
        more = server.status()["instances"]
    assert len(instances) == 1, "restoring a saved state needs no new instance"
    assert tasks()[2][2] == tasks()[0][2] and tasks()[2][3] is True, "apples' slot, the least recently used, reset"
    assert len(more) == 2


async def line_up(server, nursery, run, *named_requests) -> None:
    """Start ``run(name, request)`` for each, the next once the one before waits in the queue."""
    for waiting, (name, request) in enumerate(named_requests, start=1):
        nursery.start_soon(run, name, request)
        await wait_until(lambda: server.status()["queued"] == waiting)


async def new_conversation_then_follow_up() -> list[str]:
    """Both slots busy, a new conversation waits, then a turn of a conversation whose state is
    in the prompt cache; the order in which all four requests finished. The slot "short" frees
    (after 0.3 s) goes to the first of the two waiting, the other waits for "long"'s."""
    async with ModelServer(config(m={"slots": 2, "token_delay": 0.1, "reply": "one two three four five six"})) as server:
        finished = []

        async def run(name, request):
            await server.chat_completion(request)
            finished.append(name)

        follow_up = chat("m", "cherries", "one two three four five six", "and then?")
        save_state_of(server, follow_up)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "short", chat("m", "short", max_tokens=3))
            nursery.start_soon(run, "long", chat("m", "long"))
            await wait_until(lambda: len(tasks()) == 2)
            await line_up(server, nursery, run, ("new conversation", chat("m", "hello")), ("follow-up", follow_up))
    return finished


async def test_a_follow_up_whose_history_the_prompt_cache_holds_goes_before_an_older_new_conversation():
    finished = await new_conversation_then_follow_up()
    assert finished.index("follow-up") < finished.index("new conversation"), "continuing conversations first"


async def test_a_new_conversation_that_waited_too_long_goes_before_a_later_follow_up(monkeypatch):
    # continuing conversations first must not starve new ones: once a request has waited
    # OVERDUE_AFTER_S, it keeps its arrival order
    monkeypatch.setattr("lllms_core.pool.OVERDUE_AFTER_S", 0.1)
    finished = await new_conversation_then_follow_up()
    assert finished.index("new conversation") < finished.index("follow-up"), "it had waited 0.3 s when a slot freed"


async def test_a_new_conversation_leaves_the_slot_a_waiting_follow_up_continues():
    reply = "one two three"
    async with ModelServer(config({"concurrency": 1}, m={"slots": 2, "token_delay": 0.1, "reply": reply})) as server:
        await server.chat_completion(chat("m", "my cat is called Tom"))  # now the least recently used slot
        finished = []

        async def run(name, request):
            finished.append((name, await server.chat_completion(request)))

        follow_up = chat("m", "my cat is called Tom", reply, "what is my cat called?")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "running", chat("m", "my dog is called Rex"))
            await wait_until(lambda: len(tasks()) == 2)
            await line_up(server, nursery, run, ("new conversation", chat("m", "hello")), ("follow-up", follow_up))
    assert [name for name, _ in finished] == ["running", "follow-up", "new conversation"], "continuations first"
    (_, _, cat_slot, _), (_, _, dog_slot, _), (_, _, follow_up_slot, _), (_, _, new_slot, _) = tasks()
    assert new_slot == dog_slot, "the new conversation took the slot nobody continues"
    assert follow_up_slot == cat_slot
    assert finished[1][1].usage.cached_tokens == len(f"my cat is called Tom {reply}".split()), "its slot kept its context"


async def test_a_model_that_needs_room_does_not_dispose_an_instance_a_waiting_request_can_use():
    big = {"memory_mib": 10_000, "reply": "ok"}
    slow = {**big, "token_delay": 0.05, "reply": "a b c d e f"}
    budget = {"memory_budget_mib": budget_for(25_000), "concurrency": 1}
    async with ModelServer(config(budget, a=big, b=slow, c=big)) as server:
        for model in ("c", "a", "b"):  # c was prepared and went; a is the least recently used model
            await server.chat_completion(chat(model, "hello"))
        del EVENTS[:]
        answers = {}

        async def run(model):
            answers[model] = await server.chat_completion(chat(model, "again"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "b")
            await wait_until(lambda: len(tasks()) == 1)
            nursery.start_soon(run, "c")  # needs room, and came first
            await wait_until(lambda: server.status()["queued"] == 1)
            nursery.start_soon(run, "a")  # a's idle slot can serve it at once
            await wait_until(lambda: server.status()["queued"] == 2)
        loads_and_disposals = [event[:2] for event in EVENTS if event[0] in ("load", "dispose")]
    assert {model: answer.choices[0].text for model, answer in answers.items()} == {"a": "ok", "b": "a b c d e f", "c": "ok"}
    assert loads_and_disposals == [("dispose", "b"), ("load", "c")], "b, which nobody waited for, went; a stayed"


async def test_gpu_detection_runs_once_per_engine_off_the_event_loop(monkeypatch):
    asked = []

    def slow_gpu_available(self):
        asked.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.3)  # an engine importing its library to tell
        return True

    monkeypatch.setattr(FakeEngine, "gpu_available", slow_gpu_available)
    models = config(a={"device": {"gpu": "auto"}, "reply": "ok"}, b={"device": {"gpu": "auto"}, "reply": "ok"})
    async with ModelServer(models) as server:
        await server.chat_completion(chat("a", "hi"))
        await server.chat_completion(chat("b", "hi"))
        devices = {i["model"]: i["device"] for i in server.status()["instances"]}
    assert asked == [False], "asked once, for the one engine both models use, not on the event loop's thread"
    assert "gpu" in devices.values(), "a model with gpu = 'auto' takes the GPU the engine reported"
