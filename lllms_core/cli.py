"""The ``lllms`` command: serve, pull, ps, run, plugins.

Only argparse, os and sys are imported at module level: each command imports what it needs, so
``lllms --help`` starts at once and never imports an engine's library.

Configuration: ``--config FILE``, else ``$LLLMS_CONFIG``, else the built-in default
(:func:`lllms_core.defaults.default_config`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lllms_core.config import Config, ModelConfig
    from lllms_core.plugins import PluginManager
    from lllms_core.store import ModelStore

DEFAULT_URL = "http://127.0.0.1:3000"
LOG_LEVELS = ("debug", "info", "warning", "error")
COMPLETION_TASKS = ("chat-completion", "text-completion")


class CommandError(Exception):
    """A failure the user can act on; shown as one line, exit status 1."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from lllms_core.errors import LllmsError
    from lllms_core.logs import setup_logging

    setup_logging(args.log_level or os.environ.get("LLLMS_LOG_LEVEL") or "warning")
    try:
        return args.handler(args) or 0
    except BaseException as raised:
        error = raised
        # a failure inside a trio nursery arrives wrapped in exception groups
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if isinstance(error, (CommandError, LllmsError)):
            message = error.message if isinstance(error, LllmsError) else str(error)
            print(f"lllms: error: {message}", file=sys.stderr)
            return 1
        if isinstance(error, KeyboardInterrupt):
            return 130
        if isinstance(error, BrokenPipeError):  # piped into a command that stopped reading (`| head`)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lllms", description="Local LLM inference server with an OpenAI-compatible API."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="log records at this level and above to stderr (default: $LLLMS_LOG_LEVEL, "
        "the config's server.log_level for serve and run, else warning)",
    )
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    def config_option(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--config", "-c", metavar="FILE", help="TOML configuration (default: $LLLMS_CONFIG, else the built-in default)"
        )

    serve = commands.add_parser("serve", help="run the HTTP server", description="Run the HTTP server until SIGINT or SIGTERM.")
    config_option(serve)
    serve.add_argument("--host", help="address to listen on (default: the config's http.host)")
    serve.add_argument("--port", type=int, help="port to listen on (default: the config's http.port)")
    serve.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="serve on a Ray cluster, each model as a Ray Serve deployment: join the cluster at ADDRESS "
        "(default: the config's ray.address, else $RAY_ADDRESS, else start Ray here); needs lllms-ray",
    )
    serve.set_defaults(handler=serve_command)

    pull = commands.add_parser(
        "pull", help="download and verify models", description="Download and verify a configured model, showing progress."
    )
    config_option(pull)
    pull.add_argument("model", nargs="?", help="id of a configured model")
    pull.add_argument("--all", action="store_true", help="every configured model")
    pull.set_defaults(handler=pull_command)

    ps = commands.add_parser("ps", help="show a running server's state", description="Show a running server's models, downloads, instances and queue.")
    ps.add_argument("--url", default=os.environ.get("LLLMS_URL", DEFAULT_URL), help=f"the server (default: $LLLMS_URL or {DEFAULT_URL})")
    ps.add_argument("--api-key", default=os.environ.get("LLLMS_API_KEY"), help="API key, if the server requires one (default: $LLLMS_API_KEY)")
    ps.add_argument("--json", action="store_true", help="print the status report as JSON")
    ps.set_defaults(handler=ps_command)

    run = commands.add_parser(
        "run",
        help="answer one prompt with a model, in this process",
        description="Load a chat or text model in this process and stream its answer to a prompt.",
    )
    config_option(run)
    run.add_argument("model", help="id of a configured chat or text-completion model")
    run.add_argument("prompt", nargs="?", help="the prompt (default: read from stdin)")
    run.add_argument("--system", help="a system message (chat models)")
    run.add_argument("--max-tokens", type=int, help="stop after this many tokens")
    run.add_argument("--temperature", type=float, help="sampling temperature, 0 to 2")
    run.set_defaults(handler=run_command)

    plugins = commands.add_parser(
        "plugins", help="list installed plugins", description="List plugins, their engines, tasks and samplers, and plugins that failed to load."
    )
    plugins.add_argument("--json", action="store_true", help="print the report as JSON")
    plugins.set_defaults(handler=plugins_command)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lllms")
    except PackageNotFoundError:
        return "unknown"


def load(path: str | None) -> tuple["Config", "PluginManager"]:
    """The configuration (``path``, ``$LLLMS_CONFIG`` or the default) and the plugins that validated it."""
    from lllms_core.config import load_config
    from lllms_core.plugins import get_plugin_manager

    plugins = get_plugin_manager()
    source: Any = path or os.environ.get("LLLMS_CONFIG")
    if not source:
        from lllms_core.defaults import default_config

        source = default_config(plugins)
    return load_config(source, plugins), plugins


def _use_config_log_level(args: argparse.Namespace, config: "Config") -> None:
    if not (args.log_level or os.environ.get("LLLMS_LOG_LEVEL")):
        from lllms_core.logs import setup_logging

        setup_logging(config.server.log_level)


def _model(config: "Config", model_id: str) -> "ModelConfig":
    model = config.models.get(model_id)
    if model is None:
        known = ", ".join(sorted(config.models)) or "none"
        raise CommandError(f"no model {model_id!r} in the configuration (configured: {known})")
    return model


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


# --- serve ----------------------------------------------------------------------


def serve_command(args: argparse.Namespace) -> int:
    config, _ = load(args.config)
    _use_config_log_level(args, config)
    if args.ray is not None:
        try:
            from lllms_ray.deploy import serve as serve_on_ray
        except ImportError:
            raise CommandError("--ray needs the lllms-ray plugin: pip install lllms-ray") from None
        serve_on_ray(config, address=args.ray or None, host=args.host, port=args.port)
        return 0
    from lllms_core.http import serve

    try:
        serve(config, host=args.host, port=args.port)
    except* OSError as group:  # a port in use, from inside hypercorn's nurseries
        error = group.exceptions[0]
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        address = f"{args.host or config.http.host}:{config.http.port if args.port is None else args.port}"
        raise CommandError(f"cannot serve on {address}: {error.strerror or error}") from None
    return 0


# --- pull -----------------------------------------------------------------------


def pull_command(args: argparse.Namespace) -> int:
    import trio

    from lllms_core.store import ModelStore

    if args.all == bool(args.model):
        raise CommandError("name one model, or use --all")
    config, _ = load(args.config)
    models = list(config.models.values()) if args.all else [_model(config, args.model)]
    store = ModelStore(config, {})  # no engines: a prepared model is its downloaded, verified file
    return trio.run(_pull, store, models)


async def _pull(store: "ModelStore", models: list["ModelConfig"]) -> int:
    from lllms_core.errors import LllmsError

    out = _console()
    failed = 0
    for model in models:
        try:
            location = await prepare_showing_progress(store, model)
        except LllmsError as error:
            if len(models) == 1:
                raise
            _console(stderr=True).print(f"[red]✗[/red] {model.id}: {error.message}", soft_wrap=True)
            failed += 1
            continue
        out.print(f"[green]✓[/green] {model.id}: {_describe_location(store, model, location)}", soft_wrap=True)
    if failed:
        raise CommandError(f"{failed} of {len(models)} models failed")
    return 0


def _describe_location(store: "ModelStore", model: "ModelConfig", location: Any) -> str:
    if location is None:
        return f"ready (engine {model.engine!r} needs no model file)"
    checked = [name for name in ("sha256", "md5") if getattr(model, name)]
    if checked:
        return f"{location} ({' and '.join(checked)} verified)"
    known = store.verified.digests(location, location.stat()) if location.is_file() else {}
    if "sha256" in known:
        return f"{location} (no checksum configured; its sha256 is {known['sha256']})"
    return f"{location} (no checksum configured)"


class DownloadBars:
    """Rich progress bars (on stderr) for the running downloads of one model, from the
    store's cheap snapshots; nothing is shown for a model that needs no download."""

    def __init__(self, store: "ModelStore", model: "ModelConfig"):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.store = store
        self.model = model
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=_console(stderr=True),
        )
        self.bars: dict[str, Any] = {}
        """File → its bar's task id."""

    def show(self) -> None:
        for download in self.store.downloads():
            if download.model != self.model.id:
                continue
            if download.file not in self.bars:
                if not self.bars:
                    self.progress.start()
                name = f"{self.model.id} {os.path.basename(download.file)}"
                self.bars[download.file] = self.progress.add_task(name, total=download.total)
            self.progress.update(self.bars[download.file], completed=download.downloaded, total=download.total)

    async def poll(self) -> None:
        import trio

        while True:
            self.show()
            await trio.sleep(0.1)

    def complete(self) -> None:
        """Fill the bars: the downloads finished (faster, maybe, than they were polled)."""
        for file, bar in self.bars.items():
            size = os.path.getsize(file)
            self.progress.update(bar, completed=size, total=size)

    def stop(self) -> None:
        if self.bars:  # stopping a display never started would print an empty line
            self.progress.stop()


async def prepare_showing_progress(store: "ModelStore", model: "ModelConfig") -> Any:
    """``store.prepare(model)`` (download, verify) with a progress bar per download."""
    import trio

    from lllms_core.errors import LllmsError

    bars = DownloadBars(store, model)
    error: LllmsError | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bars.poll)
            try:
                location = await store.prepare(model)
            except LllmsError as failure:  # raised below, not wrapped in the nursery's ExceptionGroup
                error = failure
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        bars.complete()
    finally:
        bars.stop()
    return location


# --- ps -------------------------------------------------------------------------


def ps_command(args: argparse.Namespace) -> int:
    import httpx

    url = args.url.rstrip("/") + "/"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=10)
    except httpx.HTTPError as error:
        raise CommandError(f"cannot reach the server at {url}: {error}") from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text.strip()[:200]
        raise CommandError(f"{url} answered {response.status_code}: {message}")
    if args.json:
        print(response.text)
        return 0
    show_status(response.json())
    return 0


def _size(count: float | None) -> str:
    if count is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _download_text(download: dict[str, Any]) -> str:
    percent = f"{download['percent']:.0f}%" if download.get("percent") is not None else "?%"
    text = f"{percent} of {_size(download.get('total'))} at {_size(download.get('speed'))}/s"
    if download.get("eta") is not None:
        text += f", {download['eta']:.0f} s left"
    return text


def _ago(timestamp: str | None) -> str:
    """``2026-11-25T03:43:15Z`` → ``12 s ago``."""
    import calendar
    import time

    if not timestamp:
        return "never"
    try:
        seconds = time.time() - calendar.timegm(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return timestamp
    if seconds < 120:
        return f"{max(seconds, 0):.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def show_status(status: dict[str, Any]) -> None:
    """The status report of ``GET /`` as tables."""
    from rich.table import Column, Table

    console = _console()
    state = "[green]ready[/green]" if status.get("ready") else "[yellow]starting[/yellow]"
    console.print(
        f"{state} · {status.get('processing', 0)} processing · {status.get('queued', 0)} queued"
        f" · concurrency {status.get('concurrency', '?')}"
    )

    models = Table("model", "engine", "task", "state", "download", title="Models", title_justify="left")
    for model_id, model in status.get("models", {}).items():
        state = model.get("state", "")
        if model.get("error"):
            state = f"[red]{state}: {model['error']}[/red]"
        downloads = "\n".join(_download_text(download) for download in model.get("downloads") or [])
        models.add_row(model_id, model.get("engine", ""), model.get("task", ""), state, downloads)
    console.print(models)

    instances = Table(
        Column("instance", no_wrap=True), "model", "state", "device", "slots busy/total", "last used",
        title="Instances", title_justify="left",
    )
    for instance in status.get("instances", []):
        slots = instance.get("slots", [])
        busy = sum(1 for slot in slots if slot.get("busy"))
        instances.add_row(
            instance.get("id", ""),
            instance.get("model", ""),
            instance.get("state", ""),
            instance.get("device", ""),
            f"{busy}/{len(slots)}",
            _ago(instance.get("last_used")),
        )
    if status.get("instances"):
        console.print(instances)
    else:
        console.print("No instances loaded.")


# --- run ------------------------------------------------------------------------


def run_command(args: argparse.Namespace) -> int:
    import msgspec
    import trio

    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise CommandError("give a prompt, or pipe one to stdin")
        prompt = sys.stdin.read()
    config, plugins = load(args.config)
    _use_config_log_level(args, config)
    model = _model(config, args.model)
    if model.task not in COMPLETION_TASKS:
        raise CommandError(f"model {model.id!r} does {model.task}; run needs a chat-completion or text-completion model")
    if args.system is not None and model.task != "chat-completion":
        raise CommandError(f"--system needs a chat-completion model; {model.id!r} does {model.task}")
    # only this model, loaded on demand: the others of the configuration stay untouched
    model = msgspec.structs.replace(model, min_instances=0, prepare="on-demand")
    config = msgspec.structs.replace(config, models={model.id: model})
    request: dict[str, Any] = {"model": model.id}
    if args.max_tokens is not None:
        request["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        request["temperature"] = args.temperature
    if model.task == "chat-completion":
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        request["messages"] = [*system, {"role": "user", "content": prompt}]
    else:
        request["prompt"] = prompt
    return trio.run(_run, config, plugins, model, request)


async def _run(config: "Config", plugins: "PluginManager", model: "ModelConfig", request: dict[str, Any]) -> int:
    from lllms_core.server import ModelServer

    async with ModelServer(config, plugins=plugins) as server:
        await prepare_showing_progress(server.store, model)
        if model.task == "chat-completion":
            answer = server.stream_chat_completion(request)
        else:
            answer = server.stream_text_completion(request)
        async with answer as stream:
            async for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


# --- plugins --------------------------------------------------------------------


def plugin_report(plugins: "PluginManager") -> dict[str, Any]:
    """Installed plugins and what each registered, and the plugins that failed to load."""
    engines, tasks, samplers = plugins.engines, plugins.tasks, plugins.samplers
    installed = []
    for name, distribution in sorted(plugins.distributions.items()):
        package, _, version = distribution.rpartition(" ")
        installed.append({"name": name, "distribution": package, "version": version})
    return {
        "plugins": installed,
        "engines": [
            {
                "name": name,
                "plugin": plugins.owners["engine"][name],
                "tasks": sorted(engine.tasks),
                "default_task": engine.default_task,
                "capabilities": sorted(engine.capabilities),
                "options": list(engine.options.__struct_fields__),
            }
            for name, engine in sorted(engines.items())
        ],
        "tasks": [
            {"name": name, "plugin": plugins.owners["task"][name], "streams": task.streams, "features": [f.name for f in task.features]}
            for name, task in sorted(tasks.items())
        ],
        "samplers": [
            {
                "name": name,
                "plugin": plugins.owners["sampler"][name],
                "parameters": list(sampler.parameters),
                "description": sampler.description,
            }
            for name, sampler in sorted(samplers.items())
        ],
        "failed": [{"name": name, "error": error} for name, error in sorted(plugins.failed.items())],
    }


def plugins_command(args: argparse.Namespace) -> int:
    import msgspec
    from rich.table import Table

    from lllms_core.plugins import get_plugin_manager

    report = plugin_report(get_plugin_manager())
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(report)).decode())
        return 0
    console = _console()

    def table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]], empty: str) -> None:
        if not rows:
            console.print(f"{title}: {empty}")
            return
        output = Table(*columns, title=title, title_justify="left")
        for row in rows:
            output.add_row(*row)
        console.print(output)

    table("Plugins", ("plugin", "distribution", "version"),
          [(p["name"], p["distribution"], p["version"]) for p in report["plugins"]], "none installed")
    table("Engines", ("engine", "plugin", "tasks", "capabilities"),
          [(e["name"], e["plugin"] or "", ", ".join(e["tasks"]), ", ".join(e["capabilities"])) for e in report["engines"]],
          "none (install an engine plugin, e.g. lllms-llamacpp)")
    table("Tasks", ("task", "plugin", "streams"),
          [(t["name"], t["plugin"] or "", "yes" if t["streams"] else "no") for t in report["tasks"]], "none")
    table("Samplers", ("sampler", "plugin", "parameters", "description"),
          [(s["name"], s["plugin"] or "", ", ".join(s["parameters"]), s["description"]) for s in report["samplers"]], "none")
    if report["failed"]:
        table("Failed to load", ("plugin", "error"), [(f["name"], f"[red]{f['error']}[/red]") for f in report["failed"]], "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
