"""What the ingress knows of the replicas: readiness and the status report of ``GET /``,
aggregated over every replica of every model.

Each replica reports its ModelServer's status with its routing stats (every
``ray.stats_period`` seconds); :meth:`ClusterPool.status` assembles those reports
(what metrics read), :meth:`ClusterPool.report` asks every replica afresh (what
``GET /`` answers).
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import RunningReplica

from lllms_core.config import Config
from lllms_core.errors import LllmsError

from lllms_ray.portal import TrioPortal

ROUTERS: dict[tuple[str, str], Any] = {}
"""(application, deployment) → the request router of that deployment's handle in this
process (see :mod:`lllms_ray.router`)."""
REPORT_TIMEOUT = 2.0
"""Seconds a replica has to answer a status request before it is reported unreachable."""
SERVE_NAMESPACE = "serve"
"""The Ray namespace of Serve's actors (where replicas are found by name)."""
MODEL_STATES = ("ready", "preparing", "error", "unprepared")
"""A model's state over its replicas: the first of these that any replica reports."""


class NotOnAClusterError(LllmsError):
    status = 501
    type = "server_error"
    code = "not_on_a_cluster"


class ClusterPool:
    """The replicas of the models' deployments, seen as the one pool of a ModelServer.

    What only one machine's pool has (its instances, a slot to hold) is refused with a
    501 that says so, for the routes that reach for it (Ollama's ``/api/ps`` and loading
    or unloading with ``keep_alive``)."""

    def __init__(self, config: Config, handles: dict[str, DeploymentHandle], portal: TrioPortal):
        self.config = config
        self.portal = portal
        self.models: dict[str, list[str]] = {}
        """Deployment name → the ids of its models."""
        self.app = ""
        for model_id, handle in handles.items():
            self.models.setdefault(handle.deployment_name, []).append(model_id)
            self.app = handle.app_name
            handle.options(stream=True)  # creates the handle's router now: it follows the replicas
        self._actors: dict[str, Any] = {}

    def replicas(self) -> dict[str, list[RunningReplica]]:
        """Deployment name → its running replicas."""
        found = {}
        for deployment in self.models:
            router = ROUTERS.get((self.app, deployment))
            found[deployment] = list(router.curr_replicas.values()) if router is not None else []
        return found

    @property
    def instances(self):
        raise NotOnAClusterError("this route reads one machine's loaded instances; on a cluster, GET / reports every replica's")

    def acquire(self, *args: Any, **kwargs: Any):
        raise NotOnAClusterError("this route holds a slot of one machine's pool; on a cluster, replicas keep their models loaded")

    def running(self, model_id: str) -> bool:
        """Whether the model's deployment has a running replica."""
        deployment = self.config.models[model_id].replicas.group or model_id
        router = ROUTERS.get((self.app, deployment))
        return router is not None and bool(router.curr_replicas)

    def failures(self) -> dict[str, str]:
        """Nothing here: a replica that fails to start is retried and reported by Ray Serve
        (``serve status``); the ingress stays not ready until each deployment has a replica."""
        return {}

    @property
    def ready(self) -> bool:
        """Every model that must keep a replica has one running."""
        replicas = self.replicas()
        return all(
            replicas[deployment] or self.config.models[models[0]].replicas.min == 0
            for deployment, models in self.models.items()
        )

    def status(self) -> dict[str, Any]:
        """From the replicas' last reports (at most ``stats_period`` old)."""
        return self._merge(
            {
                deployment: [(replica, (replica.routing_stats or {}).get("status")) for replica in replicas]
                for deployment, replicas in self.replicas().items()
            }
        )

    async def report(self) -> dict[str, Any]:
        """From every replica, asked now."""
        replicas = self.replicas()
        reports = await self.portal.run_asyncio(self._ask, [r for found in replicas.values() for r in found])
        return self._merge(
            {deployment: [(replica, reports.get(replica.replica_id)) for replica in found] for deployment, found in replicas.items()}
        )

    async def _ask(self, replicas: list[RunningReplica]) -> dict[Any, dict | None]:
        async def ask(replica: RunningReplica) -> dict | None:
            try:
                actor = await self._actor(replica)
                stats = await asyncio.wait_for(actor.record_routing_stats.remote(), REPORT_TIMEOUT)
            except Exception:  # a replica that is gone or hangs is reported unreachable
                return None
            return stats.get("status")

        answers = await asyncio.gather(*(ask(replica) for replica in replicas))
        return {replica.replica_id: answer for replica, answer in zip(replicas, answers)}

    async def _actor(self, replica: RunningReplica) -> Any:
        name = replica.replica_id.to_full_id_str()
        if name not in self._actors:
            self._actors[name] = await asyncio.to_thread(ray.get_actor, name, namespace=SERVE_NAMESPACE)
        return self._actors[name]

    def _merge(self, reports: dict[str, list[tuple[RunningReplica, dict | None]]]) -> dict[str, Any]:
        models: dict[str, dict[str, Any]] = {}
        instances: list[dict[str, Any]] = []
        replicas: list[dict[str, Any]] = []
        processing = queued = 0
        for deployment, found in reports.items():
            for model_id in self.models[deployment]:
                model = self.config.models[model_id]
                models[model_id] = {
                    "engine": model.engine,
                    "task": model.task,
                    "deployment": deployment,
                    "replicas": len(found),
                    "state": "unprepared",
                    "error": None,
                    "location": None,
                    "downloads": [],
                }
            for replica, status in found:
                replicas.append(
                    {
                        "id": replica.replica_id.unique_id,
                        "deployment": deployment,
                        "node": replica.node_id,
                        "reachable": status is not None,
                        "processing": status["processing"] if status else None,
                        "queued": status["queued"] if status else None,
                    }
                )
                if status is None:
                    continue
                processing += status["processing"]
                queued += status["queued"]
                for instance in status["instances"]:
                    instances.append({**instance, "replica": replica.replica_id.unique_id, "node": replica.node_id})
                for model_id, report in status["models"].items():
                    merged = models[model_id]
                    if MODEL_STATES.index(report["state"]) < MODEL_STATES.index(merged["state"]):
                        merged["state"], merged["error"], merged["location"] = report["state"], report["error"], report["location"]
                    merged["downloads"] += report["downloads"]
        return {
            "ready": self.ready,
            "processing": processing,
            "queued": queued,
            "concurrency": self.config.server.concurrency,
            "models": models,
            "instances": instances,
            "replicas": replicas,
        }
