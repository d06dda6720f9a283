"""An lllms configuration as a Ray Serve application, and running it.

One deployment per model (or per ``replicas.group``), of :class:`~lllms_ray.replica.ModelReplica`,
with the model's replica bounds, resources, autoscaling and router; one :class:`~lllms_ray.ingress.Ingress`
on the head node, serving the HTTP API on ``http.host:http.port``.

- :func:`build` makes the application from a Config.
- :func:`app_builder` is the import path for ``serve run`` and KubeRay's RayService:
  ``lllms_ray.deploy:app_builder`` with the argument ``config`` (a TOML path).
- :func:`connect`, :func:`deploy`, :func:`undeploy` and :func:`serve` are what
  ``lllms serve --ray`` does.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
from typing import Any

from lllms_core.config import Config, ModelConfig, load_config
from lllms_core.errors import ConfigError, LllmsError

log = logging.getLogger("lllms.ray")

HEAD_NODE = "node:__internal_head__"
"""The resource only the head node has: the ingress is placed there."""
INGRESS = "ingress"
OBJECT_STORE_MEMORY = 256 * 1024 * 1024
"""Object store of a Ray instance lllms starts itself: lllms passes only small messages."""
CONNECT_TIMEOUT = 10.0
CONSTRUCTOR_ATTEMPTS = 3
"""Replicas Ray Serve starts for a deployment whose replicas fail to start, before the
deployment has failed (each attempt is a new process, preparing the models again)."""


EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception): ")


class ClusterError(LllmsError):
    """The cluster cannot be reached, or cannot run the configuration."""

    status = 503
    type = "server_error"
    code = "cluster_error"


def deployments(config: Config) -> dict[str, list[ModelConfig]]:
    """Deployment name → its models: a model alone, or the models of a group. Models of
    one group must agree on their ``replicas`` settings."""
    groups: dict[str, list[ModelConfig]] = {}
    for model in config.models.values():
        groups.setdefault(model.replicas.group or model.id, []).append(model)
    for name, models in groups.items():
        if INGRESS == name:
            raise ConfigError(f"{name!r} names the ingress deployment; rename the model or its group")
        if models[0].replicas.group is not None and name in config.models and config.models[name] not in models:
            raise ConfigError(f"replicas.group {name!r} is also the id of a model outside the group; rename one")
        first = models[0]
        for other in models[1:]:
            if other.replicas != first.replicas:
                raise ConfigError(
                    f"models {first.id!r} and {other.id!r} share the group {name!r} but not their replicas settings"
                )
    return groups


def deployment_options(name: str, model: ModelConfig, config: Config) -> dict[str, Any]:
    from ray.serve.config import RequestRouterConfig

    from lllms_ray.router import PowerOfTwoRouter, PrefixRouter

    replicas = model.replicas
    period = config.ray.stats_period
    router_kwargs: dict[str, Any] = {"deployment": name}
    if replicas.router == "prefix":
        router_kwargs.update(imbalance=replicas.imbalance, stats_period=period)
    options: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": replicas.max_ongoing,
        # waiting for a replica with room; Ray Serve refuses every request at 0
        "max_queued_requests": max(1, config.server.max_queue),
        "max_constructor_retry_count": CONSTRUCTOR_ATTEMPTS,
        "graceful_shutdown_timeout_s": config.http.shutdown_grace,
        "ray_actor_options": {
            "num_cpus": replicas.cpus,
            "num_gpus": replicas.gpus,
            **({"memory": replicas.memory} if replicas.memory else {}),
        },
        "request_router_config": RequestRouterConfig(
            request_router_class=PrefixRouter if replicas.router == "prefix" else PowerOfTwoRouter,
            request_router_kwargs=router_kwargs,
            request_routing_stats_period_s=period,
        ),
    }
    if replicas.min == replicas.max:
        options["num_replicas"] = replicas.min
    else:
        options["autoscaling_config"] = {
            "min_replicas": replicas.min,
            "max_replicas": replicas.max,
            "initial_replicas": replicas.min,
            "target_ongoing_requests": replicas.target_ongoing,
            "upscale_delay_s": replicas.upscale_delay,
            "downscale_delay_s": replicas.downscale_delay,
            "metrics_interval_s": period,
            "look_back_period_s": 5 * period,
        }
    return options


def build(config: Config):
    """The Ray Serve application of a configuration (see the module's docstring)."""
    from ray import serve

    from lllms_ray.ingress import Ingress
    from lllms_ray.replica import ModelReplica

    bound = {}
    for name, models in deployments(config).items():
        deployment = serve.deployment(ModelReplica).options(**deployment_options(name, models[0], config))
        replica = deployment.bind(config, [model.id for model in models])
        for model in models:
            bound[model.id] = replica
    ingress = serve.deployment(Ingress).options(
        name=INGRESS,
        num_replicas=1,
        max_ongoing_requests=1,
        graceful_shutdown_timeout_s=config.http.shutdown_grace,
        # the HTTP server: on the node whose address users know, without taking a CPU from the models
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE: 0.001}},
    )
    return ingress.bind(config, bound)


def app_builder(args: dict[str, Any]):
    """``serve run lllms_ray.deploy:app_builder config=lllms.toml`` (and KubeRay's
    ``import_path``): the application of the configuration file ``config``."""
    return build(load_config(args.get("config") or os.environ.get("LLLMS_CONFIG")))


# --- running it ------------------------------------------------------------------------


def check_reachable(address: str) -> None:
    """A ``host:port`` or ``ray://host:port`` address that refuses connections is an error
    now, not after Ray's minute of retries."""
    if address in ("auto", "local"):
        return
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"{address!r} is not a Ray cluster address (auto, host:port or ray://host:port)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as error:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {error.strerror or error}") from None


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (else ``$RAY_ADDRESS``); without either, start a Ray
    instance in this process, stopped when it exits."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
    try:
        ray.init(
            address=address,
            object_store_memory=None if address else OBJECT_STORE_MEMORY,
            include_dashboard=False if not address else None,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ClusterError(f"cannot connect to the Ray cluster at {address or 'a new local instance'}: {error}") from None


def check_resources(config: Config) -> None:
    """Every model's replica fits on some node of the cluster (else Ray would wait for one forever)."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    for name, models in deployments(config).items():
        replicas = models[0].replicas
        wanted = {"CPU": replicas.cpus, "GPU": replicas.gpus, "memory": replicas.memory or 0}
        if not any(all(node.get(resource, 0) >= amount for resource, amount in wanted.items()) for node in nodes):
            largest = {resource: max((node.get(resource, 0) for node in nodes), default=0) for resource in wanted}
            raise ClusterError(
                f"deployment {name!r} asks for {_resources(wanted)} per replica, but no node of the cluster has that"
                f" (the largest offer {_resources(largest)})"
            )


def _resources(amounts: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in amounts.items() if name != "memory" or amount) or "nothing"


def deploy(config: Config) -> str:
    """Deploy (or update) the configuration's application and wait until it runs: every
    model prepared and its minimum replicas loaded; return the HTTP API's base URL. A
    failure is a ClusterError with Ray Serve's reason; so is taking longer than
    ``ray.deploy_timeout``."""
    from ray import serve

    check_resources(config)
    serve.start(proxy_location="Disabled")  # lllms' ingress serves HTTP itself
    app = config.ray.app
    failure: list[BaseException] = []
    ingress = []

    def run() -> None:
        try:
            ingress.append(serve.run(build(config), name=app, route_prefix=None))
        except BaseException as error:  # reported by the waiting thread
            failure.append(error)

    deploying = threading.Thread(target=run, name="lllms-deploy", daemon=True)
    deploying.start()
    deploying.join(config.ray.deploy_timeout)
    if deploying.is_alive():
        reason = _status_message(app) or "no reason given"
        serve.delete(app)  # ends serve.run's wait
        deploying.join(CONNECT_TIMEOUT)
        raise ClusterError(f"the application {app!r} was not running after {config.ray.deploy_timeout:g} s: {reason}")
    if failure:
        reason = _status_message(app) or _reason(failure[0])
        serve.delete(app)
        raise ClusterError(f"deploying {app!r} failed: {reason}")
    return ingress[0].url.remote().result(timeout_s=CONNECT_TIMEOUT)


def _status_message(app: str) -> str:
    """What Ray Serve says of the application's deployments that are not running."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return ""
    return "; ".join(f"{name}: {_reason(d.message)}" for name, d in status.deployments.items() if d.message)


def _reason(message: object) -> str:
    """The replica's own error in a Ray message (the last line naming an exception, after
    Ray's traceback), else its last line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    errors = [line for line in lines if EXCEPTION_LINE.match(line)]
    return errors[-1] if errors else lines[-1] if lines else type(message).__name__


def undeploy(config: Config) -> None:
    from ray import serve

    serve.delete(config.ray.app)


def serve(config: Config, address: str | None = None, host: str | None = None, port: int | None = None) -> None:
    """``lllms serve --ray``: deploy, say where the API is, serve until SIGINT or SIGTERM,
    then remove the application."""
    import msgspec

    http = msgspec.structs.replace(config.http, host=host or config.http.host, port=config.http.port if port is None else port)
    config = msgspec.structs.replace(config, http=http)
    connect(address or config.ray.address)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        url = deploy(config)
        print(f"lllms: serving on {url} (Ray Serve application {config.ray.app!r})", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        try:
            undeploy(config)
        finally:
            import ray

            ray.shutdown()
