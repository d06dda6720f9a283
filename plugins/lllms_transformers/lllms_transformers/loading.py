"""Preparing and loading models: GGUF conversion, device and dtype.

Everything here is blocking and runs in a worker thread. Models are only read
from local paths (``local_files_only``): nothing is fetched from a hub here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import filelock

from lllms_core.plugin_api import Device, ModelLoadError, cpu_threads, log_choices

log = logging.getLogger("lllms.transformers")

CONVERTED_MARK = "lllms-converted-from.json"
"""Written last into a converted model's directory: what it was made from."""


# --- preparation ------------------------------------------------------------------------


def prepare(model, location: Path, cache_dir: Path) -> Path:
    """The directory ``from_pretrained`` loads: the model's own directory, or a
    safetensors copy of its GGUF file made once in the cache."""
    gguf = _gguf_file(model, location)
    if gguf is None:
        if not location.is_dir():
            raise ModelLoadError(f"model {model.id!r}: {location} is neither a model directory nor a GGUF file")
        return location
    return convert_gguf(model, gguf, cache_dir / "transformers")


def _gguf_file(model, location: Path) -> Path | None:
    options = model.options
    if location.is_file():
        return location if location.suffix == ".gguf" else None
    if options.gguf_file:
        path = location / options.gguf_file
        if not path.is_file():
            raise ModelLoadError(f"model {model.id!r}: gguf_file {options.gguf_file!r} is not in {location}")
        return path
    if (location / "config.json").exists():
        return None
    found = sorted(location.glob("*.gguf"))
    if len(found) > 1:
        raise ModelLoadError(f"model {model.id!r}: {location} holds several GGUF files; name one with `gguf_file`")
    return found[0] if found else None


def _source_facts(gguf: Path) -> dict:
    import transformers

    stat = gguf.stat()
    return {"file": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "transformers": transformers.__version__}


def conversion_target(gguf: Path, directory: Path) -> Path:
    """Where ``convert_gguf`` keeps the converted copy of ``gguf`` (one per source path)."""
    digest = hashlib.blake2b(str(gguf.resolve()).encode(), digest_size=6).hexdigest()
    return directory / f"{gguf.stem}-{digest}"


def convert_gguf(model, gguf: Path, directory: Path) -> Path:
    """De-quantize a GGUF file into a transformers directory (safetensors, tokenizer and
    chat template), once: later calls reuse it while the GGUF file is unchanged."""
    facts = _source_facts(gguf)
    target = conversion_target(gguf, directory)
    directory.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(target) + ".lock"):
        if _up_to_date(target, facts):
            return target
        log.info("converting %s for transformers into %s (once)", gguf, target)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        work = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            # dequantize=True: plain weights, so that save_pretrained can write them
            converted = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                local_files_only=True,
                quantization_config=GgufConfig(dequantize=True),
            )
            converted.save_pretrained(work)
            tokenizer.save_pretrained(work)
            (work / CONVERTED_MARK).write_text(json.dumps(facts))
        except Exception as error:
            shutil.rmtree(work, ignore_errors=True)
            raise ModelLoadError(f"model {model.id!r}: converting {gguf.name} failed: {type(error).__name__}: {error}") from error
        shutil.rmtree(target, ignore_errors=True)
        os.replace(work, target)
        return target


def _up_to_date(target: Path, facts: dict) -> bool:
    try:
        return json.loads((target / CONVERTED_MARK).read_text()) == facts
    except (OSError, ValueError):
        return False


# --- device and dtype -------------------------------------------------------------------


def torch_device(model, device: Device):
    import torch

    if not device.gpu:
        return torch.device("cpu")
    name = device.name
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if model.device.gpu == "auto":
            log.info("model %r: CUDA is not available, running on the CPU", model.id)
            return torch.device("cpu")
        raise ModelLoadError(f"model {model.id!r} must run on the GPU, but torch sees no CUDA device")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"model {model.id!r}: {name!r} is not a torch device (use cuda, cuda:<n> or cpu)") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model {model.id!r} must run on {name!r}, but torch sees no CUDA device")
    return chosen


def torch_dtype(model, device):
    import torch

    dtype = model.options.dtype
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    return getattr(torch, dtype)


def load(model, prepared: Path, device: Device):
    """Load what ``model.task`` needs onto the device; return the engine's loaded object."""
    import torch
    from transformers.utils import logging as transformers_logging

    # a server's log is no terminal: no "Loading weights" progress bars on stderr
    transformers_logging.disable_progress_bar()

    threads = cpu_threads(device.cpu_threads)
    log_choices(model.id, {"cpu_threads": threads})
    # process-wide: every torch model of this process uses this many threads (torch's own
    # default counts cores but not a cgroup's CPU quota)
    torch.set_num_threads(threads.value)
    target = torch_device(model, device)
    dtype = torch_dtype(model, target)
    try:
        if model.task in ("chat-completion", "text-completion"):
            return _load_text(model, prepared, target, dtype)
        if model.task == "embedding":
            from lllms_transformers.embedding import Embedder
            from lllms_transformers.vision import ImageEmbedder, is_dual_encoder

            if is_dual_encoder(_config(model, prepared)):
                return ImageEmbedder.load(model, prepared, target, dtype)
            return Embedder.load(model, prepared, target, dtype)
        if model.task == "rerank":
            from lllms_transformers.rerank import Reranker

            return Reranker.load(model, prepared, target, dtype)
        if model.task == "image-to-text":
            from lllms_transformers.vision import Captioner

            return Captioner.load(model, prepared, target, dtype)
        from lllms_transformers.speech import Transcriber

        return Transcriber.load(model, prepared, target, dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"model {model.id!r} failed to load from {prepared}: {type(error).__name__}: {error}") from error


def _config(model, prepared: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(prepared, local_files_only=True, trust_remote_code=model.options.trust_remote_code)


def load_pretrained(auto_class, path: Path, model, device, dtype):
    """``auto_class.from_pretrained`` from a local path, on ``device``, in eval mode."""
    options = {"local_files_only": True, "trust_remote_code": model.options.trust_remote_code, "dtype": dtype}
    if device.type == "cpu":
        return auto_class.from_pretrained(path, **options).eval()
    # straight onto the accelerator, without a full copy in host memory first
    return auto_class.from_pretrained(path, device_map=str(device), **options).eval()


def _load_text(model, prepared: Path, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lllms_transformers.generation import TextGenerator
    from lllms_transformers.vision import is_vision_language, load_vision_language

    if (prepared / "config.json").exists() and is_vision_language(_config(model, prepared)):
        return load_vision_language(model, prepared, device, dtype)

    tokenizer = AutoTokenizer.from_pretrained(prepared, local_files_only=True, trust_remote_code=model.options.trust_remote_code)
    if model.options.chat_template:
        tokenizer.chat_template = model.options.chat_template
    causal = load_pretrained(AutoModelForCausalLM, prepared, model, device, dtype)
    limit = getattr(causal.config, "max_position_embeddings", None) or 2048
    context_size = min(model.context_size, limit) if model.context_size else limit
    return TextGenerator(causal, tokenizer, device, context_size)


def host_bytes(module) -> int:
    """Bytes of a loaded model's weights and buffers in host memory (none on an accelerator)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.element_size() * t.nelement() for t in tensors if t.device.type == "cpu")
