"""OpenAI's audio routes, mounted beside the others under ``/v1`` and ``/openai/v1``:
transcriptions and translations (speech to text), and speech (text to speech).

Streams are produced by a task of the request's own nursery (see
:mod:`lllms_core.app`), as completions are: a client that goes away cancels the
work and frees its slot. Speech is encoded in worker threads as it is synthesized.
"""

from __future__ import annotations

import base64
import logging
import math
from typing import Any

import msgspec
import trio
from quart import Blueprint, Response, current_app, request

from lllms_core.api.common import SSE_KEEPALIVE, AppState, InternalError, json_response, read_request, sse, state
from lllms_core.api.openai import events_body, with_keepalive
from lllms_core.audio import MEDIA_TYPES, StreamEncoder
from lllms_core.errors import InvalidRequestError, LllmsError
from lllms_core.schemas import SpeechRequest, TranscriptionRequest, TranscriptionResult, TranscriptionSegment
from lllms_core.server import ModelServer, validation_error

log = logging.getLogger("lllms.http")

audio_api = Blueprint("audio", __name__)

FORM_FIELDS = frozenset(TranscriptionRequest.__struct_fields__) - {"audio", "filename", "task"}
"""What a transcription form may set (``task`` is the route's)."""
LIST_FIELDS = frozenset({"timestamp_granularities"})
"""Form fields that repeat; clients name them ``field[]`` or ``field``."""

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- speech to text ---------------------------------------------------------------


async def read_transcription(task: str) -> TranscriptionRequest:
    """The transcription request of this multipart form, for ``task`` (transcribe or translate)."""
    form = await request.form
    files = await request.files
    upload = files.get("file")
    if upload is None:
        raise InvalidRequestError("`file` is required: the audio, sent as multipart/form-data", param="file")
    fields: dict[str, Any] = {}
    for name in FORM_FIELDS:
        values = form.getlist(name) + form.getlist(f"{name}[]")
        if values:
            fields[name] = values if name in LIST_FIELDS else values[0]
    data = await trio.to_thread.run_sync(upload.read)
    try:
        return msgspec.convert(
            {**fields, "audio": data, "filename": upload.filename or "audio", "task": task},
            TranscriptionRequest,
            strict=False,
        )
    except msgspec.ValidationError as error:
        raise validation_error(error) from None


async def answer_transcription(task: str) -> Response:
    transcription = await read_transcription(task)
    server = state().server
    if transcription.stream:
        send, receive = trio.open_memory_channel(math.inf)
        await request.scope["lllms.nursery"].start(
            produce_transcript, server, transcription, send, state(), request.scope["lllms.request_id"]
        )
        return current_app.response_class(events_body(receive), mimetype="text/event-stream", headers=SSE_HEADERS)
    result = await server.speech_to_text(transcription)
    return transcription_response(result, transcription)


@audio_api.post("/audio/transcriptions")
async def transcriptions() -> Response:
    return await answer_transcription("transcribe")


@audio_api.post("/audio/translations")
async def translations() -> Response:
    return await answer_transcription("translate")


async def produce_transcript(
    server: ModelServer,
    transcription: TranscriptionRequest,
    send: trio.MemorySendChannel,
    app_state: AppState,
    request_id: str,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """OpenAI's transcription events: ``transcript.text.delta`` as the text is recognised,
    then ``transcript.text.done`` with the whole text. Keep-alive comments while waiting
    for an instance; an error after the stream started is an ``{"error": ...}`` event."""
    keepalive = app_state.server.config.http.keepalive_interval
    async with send:
        async with server.stream_speech_to_text(transcription) as stream:
            task_status.started()
            try:
                async for chunk in with_keepalive(stream, send, keepalive, SSE_KEEPALIVE):
                    if chunk.text:
                        await send.send(sse({"type": "transcript.text.delta", "delta": chunk.text}))
            except LllmsError as error:
                await send.send(sse(error.to_dict()))
                return
            except Exception:
                log.exception("streaming a transcription failed", extra={"request_id": request_id})
                await send.send(sse(InternalError(f"Internal server error (request id {request_id})").to_dict()))
                return
        record_first_chunk(app_state, stream)
        await send.send(sse({"type": "transcript.text.done", "text": stream.result.text}))


def record_first_chunk(app_state: AppState, stream) -> None:
    if stream.first_token_at is not None:
        app_state.metrics.first_token(stream.model, stream.first_token_at - stream.started_at)


def segments_of(result: TranscriptionResult) -> list[TranscriptionSegment]:
    if result.segments:
        return result.segments
    return [TranscriptionSegment(id=0, start=0.0, end=result.duration or 0.0, text=result.text)]


def timestamp(seconds: float, separator: str) -> str:
    milliseconds = round(seconds * 1000)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    seconds_part, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds_part:02d}{separator}{milliseconds:03d}"


def duration_of(result: TranscriptionResult) -> float:
    if result.duration is not None:
        return result.duration
    return max((segment.end for segment in segments_of(result)), default=0.0)


def transcription_response(result: TranscriptionResult, transcription: TranscriptionRequest) -> Response:
    kind = transcription.response_format
    usage = {"type": "duration", "seconds": duration_of(result)}
    if kind == "json":
        return json_response({"text": result.text, "usage": usage})
    if kind == "verbose_json":
        segments = [
            {
                "id": segment.id,
                "seek": segment.seek,
                "start": segment.start,
                "end": segment.end,
                "text": segment.text,
                "tokens": segment.tokens,
                "temperature": segment.temperature,
                "avg_logprob": segment.avg_logprob,
                "compression_ratio": segment.compression_ratio,
                "no_speech_prob": segment.no_speech_prob,
            }
            for segment in segments_of(result)
        ]
        translated = transcription.task == "translate"
        body: dict[str, Any] = {
            "task": transcription.task,
            "language": "english" if translated else result.language or transcription.language or "",
            "duration": duration_of(result),
            "text": result.text,
            "segments": segments,
            "usage": usage,
        }
        if transcription.word_timestamps:
            body["words"] = [{"word": word.word, "start": word.start, "end": word.end} for word in result.words]
        return json_response(body)
    if kind == "text":
        text, mimetype = result.text, "text/plain"
    elif kind == "srt":
        blocks = [
            f"{number}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{s.text.strip()}\n"
            for number, s in enumerate(segments_of(result), start=1)
        ]
        text, mimetype = "\n".join(blocks), "text/plain"
    else:
        blocks = [f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in segments_of(result)]
        text, mimetype = "WEBVTT\n\n" + "\n".join(blocks), "text/vtt"
    return current_app.response_class(text, mimetype=mimetype)


# --- text to speech -----------------------------------------------------------------


@audio_api.post("/audio/speech")
async def speech() -> Response:
    speaking = await read_request(SpeechRequest)
    send, receive = trio.open_memory_channel(math.inf)
    await request.scope["lllms.nursery"].start(
        produce_speech, state().server, speaking, send, state(), request.scope["lllms.request_id"]
    )
    if speaking.stream_format == "sse":
        return current_app.response_class(events_body(receive), mimetype="text/event-stream", headers=SSE_HEADERS)
    return current_app.response_class(
        events_body(receive), mimetype=MEDIA_TYPES[speaking.response_format], headers={"Cache-Control": "no-cache"}
    )


async def produce_speech(
    server: ModelServer,
    speaking: SpeechRequest,
    send: trio.MemorySendChannel,
    app_state: AppState,
    request_id: str,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """The audio as it is synthesized and encoded: the bytes themselves, or with
    ``stream_format: sse`` the events ``speech.audio.delta`` (base64) and ``speech.audio.done``.

    The response starts with the first piece of audio, so that what fails before it (an
    unknown voice, a model that does not load) is an ordinary HTTP error. After that, an
    error ends an audio body early, or is an ``{"error": ...}`` event."""
    events = speaking.stream_format == "sse"
    encoder = StreamEncoder(speaking.response_format)

    async def emit(data: bytes) -> None:
        if data:
            delta = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")}
            await send.send(sse(delta) if events else data)

    async with send:
        async with server.stream_text_to_speech(speaking) as stream:
            first = await anext(stream, None)
            task_status.started()
            try:
                if first is not None:
                    await emit(await encoder.encode(first))
                    async for chunk in stream:
                        await emit(await encoder.encode(chunk))
                data = await encoder.finish()
            except LllmsError as error:
                if events:
                    await send.send(sse(error.to_dict()))
                return
            except Exception:
                log.exception("streaming speech failed", extra={"request_id": request_id})
                if events:
                    await send.send(sse(InternalError(f"Internal server error (request id {request_id})").to_dict()))
                return
        await emit(data)
        record_first_chunk(app_state, stream)
        if events:
            result = stream.result
            usage = {
                "input_tokens": result.input_tokens,
                "output_tokens": result.output_tokens,
                "total_tokens": result.input_tokens + result.output_tokens,
            }
            await send.send(sse({"type": "speech.audio.done", "usage": usage}))
