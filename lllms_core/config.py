"""Configuration: the server and its models, as msgspec Structs.

Configuration Structs forbid unknown fields, so a typo is an error naming the
field. A model table may also carry its engine's own options (flat, beside the
core fields); they are validated by the engine's ``options`` Struct.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

from lllms_core.errors import ConfigError

MODEL_ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"
TASK_NAMES = (
    "chat-completion", "text-completion", "embedding", "speech-to-text", "text-to-speech", "image-to-text", "rerank",
    "image-generation",
)

ModelId = Annotated[str, Meta(pattern=MODEL_ID_PATTERN)]
Seconds = Annotated[float, Meta(ge=0)]


class ConfigStruct(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    pass


class DeviceConfig(ConfigStruct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    gpu: bool | Literal["auto"] | str = "auto"
    """``true``: the model must run on the GPU; ``false``: CPU only; ``"auto"``:
    the GPU when it is free. Another string names a backend or device (it counts as ``true``)."""
    gpu_layers: Annotated[int, Meta(ge=-1)] | None = None
    cpu_threads: Annotated[int, Meta(ge=1)] | None = None
    mem_lock: bool = False

    @property
    def requires_gpu(self) -> bool:
        return self.gpu is True or (isinstance(self.gpu, str) and self.gpu != "auto")

    @property
    def allows_gpu(self) -> bool:
        return self.gpu is not False


class ChatMessageConfig(ConfigStruct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    role: Literal["system", "user", "assistant"]
    content: str


class ReplicaConfig(ConfigStruct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """How a model is served on a Ray cluster (``lllms serve --ray``); one machine ignores it.

    Each replica is a process running a ModelServer with the model (or its ``group``)."""

    min: Annotated[int, Meta(ge=0)] = 1
    max: Annotated[int, Meta(ge=1)] = 1
    cpus: Annotated[float, Meta(ge=0)] = 1
    """CPUs reserved for each replica (fractions allowed)."""
    gpus: Annotated[float, Meta(ge=0)] = 0
    memory: Annotated[int, Meta(ge=0)] | None = None
    """Bytes of memory reserved for each replica; none: no reservation."""
    max_ongoing: Annotated[int, Meta(ge=1)] = 16
    """Requests one replica takes at once (its slots and a short queue); more wait at the ingress."""
    target_ongoing: Annotated[float, Meta(gt=0)] = 4
    """Autoscaling: replicas are added while more requests than this per replica are ongoing."""
    upscale_delay: Seconds = 5
    downscale_delay: Seconds = 60
    router: Literal["prefix", "power-of-two"] = "prefix"
    """``prefix``: to the replica holding the longest prefix of the request's context;
    ``power-of-two``: Ray Serve's default (the less loaded of two random replicas)."""
    imbalance: Annotated[int, Meta(ge=0)] = 4
    """How many more ongoing requests the replica holding a prefix may have than the least
    loaded one and still get the request."""
    group: ModelId | None = None
    """Models naming the same group share one deployment: each replica serves all of them."""


class RayConfig(ConfigStruct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """The Ray cluster ``lllms serve --ray`` deploys on; one machine ignores it."""

    address: str | None = None
    """The cluster (``auto``, ``host:port``, ``ray://host:port``); none: ``$RAY_ADDRESS``,
    else a Ray instance started for this server."""
    app: Annotated[str, Meta(pattern=MODEL_ID_PATTERN)] = "lllms"
    """The Ray Serve application's name."""
    stats_period: Annotated[float, Meta(gt=0)] = 1.0
    """Seconds between each replica's report of the contexts it holds and its status."""
    deploy_timeout: Annotated[float, Meta(gt=0)] = 600
    """Seconds the deployment may take (downloads and loads included) before it is an error."""


class ModelConfig(ConfigStruct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    id: ModelId = ""
    """Filled from the key of the model's table."""
    engine: str
    task: str | None = None
    """One of the engine's tasks; the engine's default when omitted."""
    url: str | None = None
    file: str | None = None
    location: str | None = None
    files: dict[str, str | list[str]] = {}
    """A model that is a folder of files from several places: file name → its source (a URL,
    ``package://`` or a path), or the sources of its parts, joined in order into one file
    (a file split to fit a package index). The store assembles the folder in the cache;
    with ``url``/``file``/``location`` too, the folder also holds what they name."""
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    md5: Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{32}$")] | None = None
    min_instances: Annotated[int, Meta(ge=0)] = 0
    max_instances: Annotated[int, Meta(ge=1)] = 1
    ttl: Seconds = 300
    """Seconds an idle instance lives; 0 disposes it on release."""
    context_size: Annotated[int, Meta(ge=16)] | None = None
    context_overflow: Literal["drop_oldest", "error"] = "drop_oldest"
    """A prompt too long for the context: drop the oldest turns, or refuse it (see docs/chat.md)."""
    initial_messages: list[ChatMessageConfig] = []
    prefix: str | None = None
    completion_defaults: dict[str, Any] = {}
    device: DeviceConfig = field(default_factory=DeviceConfig)
    prepare: Literal["blocking", "async", "on-demand"] = "on-demand"
    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)
    options: Any = None
    """The engine's own options Struct, built from the remaining keys of the table."""


class ServerConfig(ConfigStruct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    concurrency: Annotated[int, Meta(ge=1)] | None = None
    """How many requests are processed at once, over all models; none: as many as the
    instances have slots."""
    max_queue: Annotated[int, Meta(ge=0)] = 100
    """How many requests may wait for an instance; more get a queue-full error."""
    cache_dir: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    request_timeout: Seconds | None = None
    """Seconds a request may take, waiting included; none by default."""
    responses_store_mb: Annotated[int, Meta(ge=0)] = 256
    """The most MiB of stored Responses-API responses kept in the cache directory (oldest go first)."""
    responses_store_days: Annotated[float, Meta(ge=0)] = 30
    """Stored responses older than this many days go."""
    memory_budget_mib: Annotated[int, Meta(ge=1)] | None = None
    """Memory the server may take for its models (weights, KV caches) and their prompt
    caches in RAM, in MiB; none: 80% of the memory this process may use."""
    prompt_cache_mib: Annotated[int, Meta(ge=0)] | None = None
    """RAM for each model's saved conversation states, in MiB; none: an eighth of the memory
    budget, at most 8192; 0: none kept."""
    prompt_cache_disk_gib: Annotated[float, Meta(ge=0)] = 4
    """Disk space for each model's saved states in the cache directory, in GiB; 0: none."""


class HttpConfig(ConfigStruct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 3000
    api_keys: list[str] = []
    cors_origins: list[str] = []
    max_body_size: Annotated[int, Meta(ge=1024)] = 50 * 1024 * 1024
    shutdown_grace: Seconds = 10
    keepalive_interval: Annotated[float, Meta(gt=0)] = 15
    expose_paths: bool = False
    """Show absolute file paths in the status report and error messages; by default clients
    see file names only (the log has the paths)."""


class ImagesConfig(ConfigStruct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Limits on the images requests carry (chat image parts, image embeddings, image edits)."""

    max_bytes: Annotated[int, Meta(ge=1)] = 20 * 1024 * 1024
    """Largest encoded image, fetched or sent."""
    max_pixels: Annotated[int, Meta(ge=1)] = 50_000_000
    """Largest image, in width × height."""
    max_per_request: Annotated[int, Meta(ge=1)] = 16
    """Most distinct images in one request."""
    formats: list[Literal["png", "jpeg", "webp", "gif", "bmp"]] = field(
        default_factory=lambda: ["png", "jpeg", "webp", "gif", "bmp"]
    )
    """Accepted image types."""
    fetch_urls: bool = True
    """Fetch http(s) image URLs; when false, images must come as data URLs."""
    fetch_timeout: Annotated[float, Meta(gt=0)] = 10.0
    """Seconds a fetch of one image may take, from connecting to the last byte."""


class AudioConfig(ConfigStruct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """What an uploaded audio file may be."""

    max_bytes: Annotated[int, Meta(ge=1)] = 50 * 1024 * 1024
    """Largest upload, in bytes (the HTTP body limit applies first)."""
    max_seconds: Annotated[float, Meta(gt=0)] = 3 * 3600
    """Longest audio, in seconds: decoded samples are held in memory (16 kHz mono
    float32 is 230 MB per hour)."""


class Config(ConfigStruct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    server: ServerConfig = field(default_factory=ServerConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    models: dict[str, ModelConfig] = {}

    def model(self, model_id: str) -> ModelConfig:
        return self.models[model_id]


def default_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("lllms"))


def cache_dir(config: Config) -> Path:
    return Path(config.server.cache_dir).expanduser() if config.server.cache_dir else default_cache_dir()


def _explain(error: msgspec.ValidationError, where: str) -> str:
    # msgspec names the path as "at `$.models[...]`"; say it in config terms
    text = str(error)
    return f"{where}: {text}"


def load_config(source: "Config | dict | str | os.PathLike | None", plugins=None) -> Config:
    """Build a Config from a Config, a dict or a TOML file path.

    ``plugins`` is the plugin manager (see :func:`lllms_core.plugins.get_plugin_manager`)
    whose engines validate each model's engine options; the default one is used when omitted.
    """
    if isinstance(source, Config):
        return source
    if source is None:
        raw: dict = {}
    elif isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError("the configuration must be a table (dict)")
    if plugins is None:
        from lllms_core.plugins import get_plugin_manager

        plugins = get_plugin_manager()
    raw = dict(raw)
    models_raw = raw.pop("models", {}) or {}
    if not isinstance(models_raw, dict):
        raise ConfigError("`models` must be a table of model ids to model tables")
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as error:
        raise ConfigError(_explain(error, "invalid server configuration")) from None
    models = {model_id: _load_model(model_id, spec, plugins) for model_id, spec in models_raw.items()}
    config.models = models
    return config


_MODEL_FIELDS = frozenset(ModelConfig.__struct_fields__) - {"options", "id"}


def _load_model(model_id: str, spec: Any, plugins) -> ModelConfig:
    where = f"model {model_id!r}"
    if not re.match(MODEL_ID_PATTERN, model_id):
        raise ConfigError(f"{where}: a model id may contain only letters, digits and `_ . : -`")
    if isinstance(spec, ModelConfig):
        spec = msgspec.to_builtins(spec)
        spec.pop("id", None)
        options = spec.pop("options", None) or {}
        spec.update(options)
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a table of model settings")
    core = {key: value for key, value in spec.items() if key in _MODEL_FIELDS}
    engine_fields = {key: value for key, value in spec.items() if key not in _MODEL_FIELDS}
    engine_name = core.get("engine")
    if engine_name is None:
        raise ConfigError(f"{where}: `engine` is required")
    engine = plugins.engines.get(engine_name)
    if engine is None:
        known = ", ".join(sorted(plugins.engines)) or "none installed"
        raise ConfigError(f"{where}: unknown engine {engine_name!r} (installed engines: {known})")
    try:
        model = msgspec.convert(core, ModelConfig)
    except msgspec.ValidationError as error:
        raise ConfigError(_explain(error, where)) from None
    try:
        model.options = msgspec.convert(engine_fields, engine.options)
    except msgspec.ValidationError as error:
        raise ConfigError(_explain(error, f"{where} (options of engine {engine_name!r})")) from None
    model.id = model_id
    model.task = model.task or engine.default_task
    if model.task not in engine.tasks:
        raise ConfigError(
            f"{where}: engine {engine_name!r} does not do task {model.task!r} (it does: {', '.join(sorted(engine.tasks))})"
        )
    if not (model.url or model.file or model.location or model.files) and engine.needs_model_file:
        raise ConfigError(f"{where}: one of `url`, `file`, `location` or `files` is required")
    for name, sources in model.files.items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or any(part in ("", ".", "..") for part in parts):
            raise ConfigError(f"{where}: `files` names a file inside the model's folder, not {name!r}")
        if isinstance(sources, list) and not sources:
            raise ConfigError(f"{where}: `files.{name}` lists no parts")
    if model.min_instances > model.max_instances:
        raise ConfigError(f"{where}: min_instances ({model.min_instances}) exceeds max_instances ({model.max_instances})")
    if model.replicas.min > model.replicas.max:
        raise ConfigError(f"{where}: replicas.min ({model.replicas.min}) exceeds replicas.max ({model.replicas.max})")
    for name in model.completion_defaults:
        if name not in plugins.completion_parameters:
            raise ConfigError(f"{where}: completion_defaults has unknown parameter {name!r}")
        sampler = next((s for s in plugins.samplers.values() if name in s.parameters), None)
        if sampler is not None and sampler.name not in engine.capabilities and not (
            sampler.logits_processor is not None and engine.logits_processors
        ):
            raise ConfigError(
                f"{where}: completion_defaults sets {name!r}, but engine {engine_name!r} cannot apply the sampler {sampler.name!r}"
            )
    from lllms_core.schemas import TextCompletionRequest

    try:
        msgspec.convert({"model": model_id, "prompt": "", **model.completion_defaults}, TextCompletionRequest)
    except msgspec.ValidationError as error:
        raise ConfigError(_explain(error, f"{where}: completion_defaults")) from None
    return model
