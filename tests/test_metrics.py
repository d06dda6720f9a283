"""What a Prometheus scrape of /metrics shows, from a ModelServer running the fake engine."""

from __future__ import annotations

import hashlib

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from helpers.fileserver import FileServer
from lllms_core.metrics import Metrics
from lllms_core.server import ModelServer

pytestmark = pytest.mark.timeout(30)


def config(tmp_path, **models):
    return {
        "server": {"cache_dir": str(tmp_path / "cache")},
        "models": {name: {"engine": "fake", **spec} for name, spec in models.items()},
    }


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """Every sample of a rendered scrape: (name, labels) → value."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def sample(samples, name, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_requests_latency_first_token_and_tokens_are_counted(tmp_path):
    async with ModelServer(config(tmp_path, m1={"min_instances": 1})) as server:
        metrics = Metrics(server)
        metrics.request_finished("/v1/chat/completions", 200, 0.3)
        metrics.request_finished("/v1/chat/completions", 200, 4.0)
        metrics.request_finished("/v1/chat/completions", 400, 0.002)
        metrics.request_finished("/v1/models", 200, 0.001)
        metrics.first_token("m1", 0.02)
        metrics.tokens_generated("m1", 5)
        metrics.tokens_generated("m1", 7)

        samples = scrape(metrics)

    route = "/v1/chat/completions"
    assert sample(samples, "lllms_requests_total", route=route, status="200") == 2
    assert sample(samples, "lllms_requests_total", route=route, status="400") == 1
    assert sample(samples, "lllms_requests_total", route="/v1/models", status="200") == 1
    assert sample(samples, "lllms_request_duration_seconds_count", route=route) == 3
    assert sample(samples, "lllms_request_duration_seconds_sum", route=route) == pytest.approx(4.302)
    assert sample(samples, "lllms_request_duration_seconds_bucket", route=route, le="0.5") == 2
    assert sample(samples, "lllms_request_duration_seconds_bucket", route=route, le="5.0") == 3
    assert sample(samples, "lllms_time_to_first_token_seconds_count", model="m1") == 1
    assert sample(samples, "lllms_time_to_first_token_seconds_sum", model="m1") == pytest.approx(0.02)
    assert sample(samples, "lllms_tokens_generated_total", model="m1") == 12


async def test_scrape_shows_instances_slots_queue_and_requests_in_progress(tmp_path):
    spec = {"min_instances": 1, "max_instances": 1, "slots": 1, "token_delay": 0.05, "reply": "a b c d e f g h"}
    async with ModelServer(config(tmp_path, m1=spec, idle={})) as server:
        metrics = Metrics(server)
        samples = scrape(metrics)
        assert sample(samples, "lllms_instances", model="m1", state="idle") == 1
        assert sample(samples, "lllms_instances", model="m1", state="busy") == 0
        assert sample(samples, "lllms_instances", model="idle", state="idle") == 0
        assert sample(samples, "lllms_slots", model="m1", state="free") == 1
        assert sample(samples, "lllms_queued_requests") == 0
        assert sample(samples, "lllms_processing_requests") == 0
        assert sample(samples, "lllms_ready") == 1

        request = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
        async with trio.open_nursery() as nursery:
            async with server.stream_chat_completion(request) as first:
                await first.__anext__()  # generating now
                nursery.start_soon(server.chat_completion, request)
                with trio.fail_after(5):
                    while server.pool.queued < 1:
                        await trio.sleep(0.01)
                samples = scrape(metrics)
                async for _ in first:
                    pass

    assert sample(samples, "lllms_processing_requests") == 1
    assert sample(samples, "lllms_queued_requests") == 1
    assert sample(samples, "lllms_instances", model="m1", state="busy") == 1
    assert sample(samples, "lllms_slots", model="m1", state="busy") == 1
    assert sample(samples, "lllms_slots", model="m1", state="free") == 0


async def test_scrape_shows_download_progress_and_model_state(tmp_path):
    content = bytes(range(256)) * 2048  # 512 KiB
    with FileServer(tmp_path / "www") as files:
        files.rate = 256 * 1024  # two seconds for the whole file
        url = files.add("/models/weights.bin", content)
        spec = {"url": url, "sha256": hashlib.sha256(content).hexdigest()}
        async with ModelServer(config(tmp_path, m1=spec), wait_ready=False) as server:
            metrics = Metrics(server)
            assert sample(scrape(metrics), "lllms_model_state", model="m1", state="unprepared") == 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.store.prepare, server.config.models["m1"])
                with trio.fail_after(5):
                    while not (server.store.downloads() and server.store.downloads()[0].downloaded > 0):
                        await trio.sleep(0.01)
                during = scrape(metrics)
            after = scrape(metrics)

    assert 0 < sample(during, "lllms_download_bytes", model="m1") < len(content)
    assert sample(during, "lllms_download_size_bytes", model="m1") == len(content)
    assert sample(during, "lllms_model_state", model="m1", state="preparing") == 1
    assert ("lllms_download_bytes", frozenset({("model", "m1")})) not in after
    assert sample(after, "lllms_model_state", model="m1", state="ready") == 1
    assert sample(after, "lllms_model_state", model="m1", state="preparing") == 0


def test_two_servers_metrics_do_not_share_series(tmp_path):
    server = ModelServer(config(tmp_path, m1={}))
    first, second = Metrics(server), Metrics(server)
    first.tokens_generated("m1", 3)
    body, _ = second.render()
    assert b"lllms_tokens_generated_total{" not in body
    assert b'lllms_tokens_generated_total{model="m1"} 3.0' in first.render()[0]
