"""Request routers of a model's deployment: which replica gets a request.

:class:`PrefixRouter` sends a request to the replica holding the longest prefix of its
context key (the chain of hashes of :mod:`lllms_core.context`), unless that replica has
more than ``imbalance`` ongoing requests above the least loaded one; without a prefix
anywhere, to the least loaded replica (counting the requests it chose replicas for itself,
so that requests arriving together spread at once). A replica's contexts come from its routing stats
(its pool's :meth:`~lllms_core.pool.ModelPool.context_keys`, reported every
``stats_period``) and, until a report can show them, from the requests this router sent
it. :class:`PowerOfTwoRouter` is Ray Serve's default policy.

Both register themselves in :data:`lllms_ray.status.ROUTERS`, so that the ingress in the
same process knows each deployment's running replicas and their reports. (Ray Serve
pickles this module by value into each process that routes, so the registry lives in
another module.)
"""

from __future__ import annotations

import random
import time
from typing import Any

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

SENT_MEMORY = 2048
"""Context hashes remembered per replica from the requests sent to it."""
CHOICE_TTL = 5.0
"""Seconds a choice counts as load on its replica before the request is seen routed
(a request cancelled while it waited for a replica is never seen again)."""


class Registered:
    """Registers the router under its deployment when Serve initializes it."""

    def register(self, deployment: str) -> None:
        from lllms_ray import status

        status.ROUTERS[(self.app_name, deployment)] = self


class PrefixRouter(Registered, RequestRouter):
    def initialize_state(self, deployment: str = "", imbalance: int = 4, stats_period: float = 1.0, **kwargs: Any) -> None:
        self.register(deployment)
        self.imbalance = imbalance
        self.linger = 3 * stats_period
        """Seconds a sent request's context is remembered after it completed: by then its
        replica's report shows it (or shows it is gone)."""
        self._reported: dict[ReplicaID, tuple[int, dict[str, int]]] = {}
        """Per replica: id of the routing stats the hashes were read from, hash → depth."""
        self._sent: dict[ReplicaID, dict[str, tuple[int, float]]] = {}
        """Per replica: hash → (depth, forget after) of the contexts of requests sent to it."""
        self._in_flight: dict[str, tuple[ReplicaID, tuple[str, ...]]] = {}
        self._ongoing: dict[str, tuple[ReplicaID, float]] = {}
        """Request id → (the replica chosen for it, until when the choice counts): this
        router's own count of each replica's requests, exact at once, where Ray's queue
        lengths lag behind requests routed at the same moment."""

    # --- what each replica holds --------------------------------------------------

    def _reported_hashes(self, replica: RunningReplica) -> dict[str, int]:
        stats = replica.routing_stats or {}
        cached = self._reported.get(replica.replica_id)
        if cached is None or cached[0] != id(stats):
            hashes = {}
            for key in stats.get("contexts", ()):
                for depth, digest in enumerate(key, start=1):
                    hashes[digest] = depth
            cached = self._reported[replica.replica_id] = (id(stats), hashes)
        return cached[1]

    def match(self, replica: RunningReplica, key: tuple[str, ...]) -> int:
        """How many leading hashes of ``key`` the replica is known to hold. Hashes are
        chained, so holding the hash at a depth means holding the whole prefix."""
        reported = self._reported_hashes(replica)
        sent = self._sent.get(replica.replica_id, {})
        now = time.monotonic()
        for depth in range(len(key), 0, -1):
            digest = key[depth - 1]
            if digest in reported:
                return depth
            remembered = sent.get(digest)
            if remembered is not None and remembered[1] > now:
                return depth
        return 0

    def load(self, replica: RunningReplica) -> int:
        """Ongoing requests of the replica: those this router chose it for, or what the
        replica last said (which counts other routers' requests too), the larger."""
        now = time.monotonic()
        mine = sum(1 for chosen, until in self._ongoing.values() if chosen == replica.replica_id and until > now)
        return max(mine, self.replica_queue_len_cache.get(replica.replica_id) or 0)

    # --- the policy -----------------------------------------------------------------

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:  # chosen again (its replica refused it): not load
            self._ongoing.pop(pending_request.metadata.internal_request_id, None)
        loads = {replica.replica_id: self.load(replica) for replica in candidate_replicas}
        by_load = sorted(candidate_replicas, key=lambda replica: (loads[replica.replica_id], random.random()))
        key = tuple(pending_request.kwargs.get("routing_key") or ()) if pending_request else ()
        ranks = [[replica] for replica in by_load]
        if key:
            least = loads[by_load[0].replica_id]
            matches = {
                replica.replica_id: self.match(replica, key)
                for replica in candidate_replicas
                if loads[replica.replica_id] - least <= self.imbalance
            }
            best = max(matches.values(), default=0)
            if best:
                holders = [replica for replica in by_load if matches.get(replica.replica_id) == best]
                ranks = [holders, *([replica] for replica in by_load if replica not in holders)]
        if pending_request is not None:
            self._ongoing[pending_request.metadata.internal_request_id] = (
                ranks[0][0].replica_id, time.monotonic() + CHOICE_TTL
            )
        return ranks

    # --- remembering what was sent ----------------------------------------------------

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._ongoing[pending_request.metadata.internal_request_id] = (replica_id, float("inf"))
        key = tuple(pending_request.kwargs.get("routing_key") or ())
        if not key:
            return
        sent = self._sent.setdefault(replica_id, {})
        for depth, digest in enumerate(key, start=1):
            sent.pop(digest, None)  # re-inserted last, so the oldest are forgotten first
            sent[digest] = (depth, float("inf"))
        while len(sent) > SENT_MEMORY:
            del sent[next(iter(sent))]
        self._in_flight[pending_request.metadata.internal_request_id] = (replica_id, key)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        chosen = self._ongoing.get(internal_request_id)
        if chosen is not None and chosen[0] == replica_id:  # not a rejection followed by a new choice
            del self._ongoing[internal_request_id]
        now = time.monotonic()
        for request_id in [r for r, (_, until) in self._ongoing.items() if until <= now]:
            del self._ongoing[request_id]
        routed = self._in_flight.pop(internal_request_id, None)
        if routed is None:
            return
        sent = self._sent.get(routed[0], {})
        forget_after = time.monotonic() + self.linger
        for digest in routed[1]:
            if digest in sent:
                sent[digest] = (sent[digest][0], forget_after)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._sent.pop(replica_id, None)
        self._reported.pop(replica_id, None)
        for request_id in [r for r, (chosen, _) in self._ongoing.items() if chosen == replica_id]:
            del self._ongoing[request_id]


class PowerOfTwoRouter(Registered, PowerOfTwoChoicesRequestRouter):
    """Ray Serve's default router (two random replicas, the less loaded one), registered."""

    def initialize_state(self, deployment: str = "", **kwargs: Any) -> None:
        self.register(deployment)
