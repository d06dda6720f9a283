"""A real local Ray cluster for the session: a head node and a worker node, both on
127.0.0.1, each with its own model cache (as separate machines would have), small
object stores and fractional CPU reservations. Configurations are deployed on it as
Ray Serve applications, each behind its own lllms ingress on a free port.

Everything is stopped at the end of the session (Serve, the driver, every node) and the
cluster's temporary directory removed.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from helpers.api_models import API_SERVER_CONFIG, APIS_SERVER_CONFIG

from lllms_core.config import load_config

NODE_OBJECT_STORE = 80 * 1024 * 1024
"""Bytes of object store per node (Ray's minimum is 75 MiB): lllms sends only small messages."""


class Node:
    def __init__(self, name: str, cache: Path):
        self.name = name
        self.cache = cache
        """The node's ``XDG_CACHE_HOME``: its lllms model cache is ``cache/lllms``."""


class RayCluster:
    def __init__(self, cluster, nodes: list[Node], temp_dir: str):
        self.cluster = cluster
        self.nodes = nodes
        self.temp_dir = temp_dir
        self.address = cluster.address


class RayServer:
    """A configuration deployed as a Ray Serve application; like the core tests'
    BackgroundServer, it has ``base_url``, ``url(path)`` and ``config``."""

    def __init__(self, config: Any, base_url: str, app: str):
        self.config = config
        self.base_url = base_url
        self.app = app

    def url(self, path: str) -> str:
        return self.base_url + path

    def stop(self) -> None:
        from ray import serve

        serve.delete(self.app)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from lllms_ray.deploy import connect

    # Ray's socket paths must be short: not pytest's tmp_path
    temp_dir = tempfile.mkdtemp(prefix="lllms-ray-", dir="/tmp")
    # Cluster writes the head's address into Ray's default temporary directory
    address_file = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    address_file.parent.mkdir(exist_ok=True)
    nodes = [Node(name, Path(temp_dir) / f"cache-{name}") for name in ("head", "worker")]
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 2,
                "object_store_memory": NODE_OBJECT_STORE,
                "temp_dir": temp_dir,
                "include_dashboard": False,
                "resources": {"head": 1},
                "env_vars": {"XDG_CACHE_HOME": str(nodes[0].cache)},
            },
        )
        cluster.add_node(
            num_cpus=2,
            object_store_memory=NODE_OBJECT_STORE,
            resources={"worker": 1},
            env_vars={"XDG_CACHE_HOME": str(nodes[1].cache)},
        )
        connect(cluster.address)
        serve.start(proxy_location="Disabled")
        yield RayCluster(cluster, nodes, temp_dir)
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            if cluster is not None:
                cluster.shutdown()
                if address_file.exists() and address_file.read_text() == cluster.address:
                    address_file.unlink()
            shutil.rmtree(temp_dir, ignore_errors=True)


_apps = itertools.count()


def deploy_app(config: Any, name: str | None = None) -> RayServer:
    """Deploy ``config`` (a dict) on the session's cluster, its ingress on a free port of
    127.0.0.1, and wait until its ``/health`` says ok."""
    from lllms_ray.deploy import deploy

    app = name or f"app{next(_apps)}"
    raw = {**config, "http": {**config.get("http", {}), "host": "127.0.0.1", "port": 0}, "ray": {"app": app, **config.get("ray", {})}}
    base_url = deploy(load_config(raw))
    server = RayServer(config, base_url, app)
    wait_until_healthy(base_url)
    return server


def wait_until_healthy(base_url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base_url, timeout=10) as http:
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline, f"{base_url} did not become healthy in {timeout} s"
            time.sleep(0.1)


def in_one_deployment(config: dict) -> dict:
    """The configuration with all its models in one group: one replica serves them all."""
    models = {
        model_id: {**model, "replicas": {"group": "models", "cpus": 0.1, **model.get("replicas", {})}}
        for model_id, model in config["models"].items()
    }
    return {**config, "models": models}


@pytest.fixture(scope="session")
def deploy_on_cluster(ray_cluster) -> Callable[..., RayServer]:
    """``deploy_on_cluster(config, name=None)``: the configuration deployed as it is."""
    return deploy_app


@pytest.fixture(scope="module")
def server_factory(ray_cluster) -> Iterator[Callable[[Any], RayServer]]:
    """``server_factory(config)``, as in the core tests: the configuration served by the
    cluster (its models in one deployment), until the end of the test module."""
    servers: list[RayServer] = []

    def start(config: dict) -> RayServer:
        server = deploy_app(in_one_deployment(config))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def api_server(server_factory) -> RayServer:
    """The core API tests' server (see tests/conftest.py), on the cluster."""
    return server_factory(API_SERVER_CONFIG)


@pytest.fixture(scope="session")
def apis_server(ray_cluster) -> Iterator[RayServer]:
    """The core's other-API tests' server (see tests/conftest.py), on the cluster, shared by
    this session's modules for those APIs."""
    server = deploy_app(in_one_deployment(APIS_SERVER_CONFIG))
    yield server
    server.stop()
