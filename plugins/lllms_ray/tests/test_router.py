"""The prefix router's policy, on replicas described by their routing stats and queue
lengths (no cluster: the cluster tests show it routing real conversations)."""

from __future__ import annotations

from types import SimpleNamespace

from ray.serve._private.common import DeploymentID
from ray.serve._private.request_router.common import ReplicaQueueLengthCache

from lllms_core.context import chat_key
from lllms_core.schemas import AssistantMessage, SystemMessage, UserMessage
from lllms_ray.router import PrefixRouter

SYSTEM = SystemMessage(content="You are terse.")
HISTORY = [SYSTEM, UserMessage(content="Name a river."), AssistantMessage(content="The Nile.")]


def replica(name: str, *contexts) -> SimpleNamespace:
    """A running replica as the router sees it: its id and its last routing stats."""
    return SimpleNamespace(replica_id=name, routing_stats={"contexts": [list(key) for key in contexts]})


def make_router(imbalance: int = 2, stats_period: float = 1.0, **loads: int) -> PrefixRouter:
    router = PrefixRouter.__new__(PrefixRouter)  # Serve builds it inside a handle; only the policy is tested
    router._deployment_id = DeploymentID(name="chat", app_name="router-test")
    router._replica_queue_len_cache = ReplicaQueueLengthCache()
    router.initialize_state(deployment="chat", imbalance=imbalance, stats_period=stats_period)
    for name, load in loads.items():
        router.replica_queue_len_cache.update(name, load)
    return router


def request(*messages, number: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        kwargs={"routing_key": chat_key(messages)}, metadata=SimpleNamespace(internal_request_id=f"request-{number}")
    )


def names(ranks) -> list[list[str]]:
    return [[replica.replica_id for replica in rank] for rank in ranks]


async def test_a_follow_up_goes_to_the_replica_holding_its_history():
    router = make_router(a=1, b=0, c=0)
    replicas = [replica("a", chat_key(HISTORY)), replica("b", chat_key([SYSTEM])), replica("c")]
    follow_up = request(*HISTORY, UserMessage(content="And in France?"))
    ranks = names(await router.choose_replicas(replicas, follow_up))
    assert ranks[0] == ["a"] and sorted(ranks[1:]) == [["b"], ["c"]]
    # a new conversation with the same system prompt: the replicas holding it, least loaded
    # first, before the one that would evaluate it again
    ranks = names(await router.choose_replicas(replicas, request(SYSTEM, UserMessage(content="Hi"))))
    assert ranks == [["b", "a"], ["c"]]


async def test_a_holder_loaded_beyond_the_threshold_gives_way_to_the_least_loaded():
    replicas = [replica("a", chat_key(HISTORY)), replica("b"), replica("c")]
    follow_up = request(*HISTORY, UserMessage(content="More?"))
    assert names(await make_router(imbalance=2, a=3, b=1, c=2).choose_replicas(replicas, follow_up))[0] == ["a"]
    ranks = names(await make_router(imbalance=2, a=4, b=1, c=2).choose_replicas(replicas, follow_up))
    assert ranks == [["b"], ["c"], ["a"]]  # least loaded first


async def test_a_request_without_a_known_prefix_or_key_goes_to_the_least_loaded():
    router = make_router(a=2, b=0)
    replicas = [replica("a", chat_key(HISTORY)), replica("b")]
    assert names(await router.choose_replicas(replicas, request(UserMessage(content="New topic")))) == [["b"], ["a"]]
    assert names(await router.choose_replicas(replicas, None)) == [["b"], ["a"]]


async def test_requests_arriving_together_spread_before_any_replica_reports_them():
    router = make_router(a=0, b=0)
    replicas = [replica("a"), replica("b")]
    chosen = [
        names(await router.choose_replicas(replicas, request(UserMessage(content=f"Topic {n}"), number=n)))[0][0]
        for n in range(4)
    ]
    assert sorted(chosen) == ["a", "a", "b", "b"]


async def test_a_sent_request_is_remembered_until_its_replica_can_report_it():
    router = make_router(stats_period=0.0, a=0, b=0)  # reports come at once: forgotten on completion
    replicas = [replica("a"), replica("b")]
    first = request(UserMessage(content="Tell me a story."), number=1)
    router.on_request_routed(first, "b", result=None)
    follow_up = request(UserMessage(content="Tell me a story."), AssistantMessage(content="Once..."), UserMessage(content="Go on"))
    assert names(await router.choose_replicas(replicas, follow_up))[0] == ["b"]
    router.on_request_completed("b", "request-1")
    ranks = names(await router.choose_replicas(replicas, follow_up))
    assert sorted(ranks) == [["a"], ["b"]]
