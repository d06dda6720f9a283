"""Audio in and out, in one place for every speech engine: decoding what a client
uploads (for speech-to-text) and encoding what an engine says (for text-to-speech).

Both use PyAV (FFmpeg), installed with ``pip install 'lllms[audio]'`` (the speech
engines depend on it). The blocking work runs in worker threads, never on the trio
thread: :func:`decode` and :class:`AudioEncoder` (through :class:`StreamEncoder`).

Decoding is bounded: the upload's size, the audio's duration, its channels and its
sample rate; anything FFmpeg cannot read as audio is a 400 naming ``param``.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from lllms_core.config import AudioConfig
from lllms_core.errors import InvalidRequestError, LllmsError, PayloadTooLargeError
from lllms_core.schemas import SpeechFormat

if TYPE_CHECKING:
    from lllms_core.schemas import AudioChunk

MEDIA_TYPES: dict[str, str] = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
"""The ``Content-Type`` of each speech format."""

PCM_RATE = 24000
"""``pcm`` is raw 16-bit little-endian mono at 24 kHz, as OpenAI sends it (clients assume that rate)."""

# (container, codec, sample rate or None for the voice's own) per format
_ENCODINGS: dict[str, tuple[str, str, int | None]] = {
    "mp3": ("mp3", "libmp3lame", None),
    "opus": ("ogg", "libopus", 48000),  # opus encodes 8, 12, 16, 24 or 48 kHz only
    "aac": ("adts", "aac", None),
    "flac": ("flac", "flac", None),
    "wav": ("wav", "pcm_s16le", None),
}

MAX_CHANNELS = 32
SAMPLE_RATES = (1000, 384_000)
"""The sample rates an upload may have, in Hz."""

_LIMITER: trio.lowlevel.RunVar = trio.lowlevel.RunVar("lllms_audio_limiter")


def _limiter() -> trio.CapacityLimiter:
    """Decodings and encodings at once, per trio run (each holds a core)."""
    try:
        return _LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(2)
        _LIMITER.set(limiter)
        return limiter


class DecodedAudio(msgspec.Struct, kw_only=True):
    """An upload decoded for an engine: mono float32 samples in [-1, 1] at ``sample_rate``."""

    samples: Any
    """A 1-D ``numpy.float32`` array."""
    sample_rate: int
    source_format: str
    """The container FFmpeg found (``wav``, ``mp3``, ``ogg``...)."""
    source_rate: int
    source_channels: int

    @property
    def duration(self) -> float:
        """Seconds of audio."""
        return len(self.samples) / self.sample_rate


def _not_audio(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="file", code="invalid_audio")


def decode_audio(data: bytes, sample_rate: int = 16000, limits: AudioConfig | None = None) -> DecodedAudio:
    """Decode any audio file FFmpeg reads (wav, mp3, flac, ogg/opus, webm, m4a, ...) into
    mono float32 at ``sample_rate``. Blocking: call :func:`decode` from trio."""
    import av
    import numpy as np

    limits = limits or AudioConfig()
    if len(data) > limits.max_bytes:
        raise PayloadTooLargeError(
            f"the audio file is {len(data)} bytes; the limit is {limits.max_bytes} bytes", param="file"
        )
    if not data:
        raise _not_audio("the audio file is empty")
    max_samples = math.ceil(limits.max_seconds * sample_rate)
    pieces: list = []
    count = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise _not_audio("the file holds no audio stream")
            rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
            if not SAMPLE_RATES[0] <= (rate or 0) <= SAMPLE_RATES[1]:
                raise _not_audio(f"the audio's sample rate ({rate} Hz) is outside {SAMPLE_RATES[0]}–{SAMPLE_RATES[1]} Hz")
            if channels > MAX_CHANNELS:
                raise _not_audio(f"the audio has {channels} channels; at most {MAX_CHANNELS} are accepted")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            frames = container.decode(stream)
            for frame in [*frames, None]:  # None flushes the resampler
                for out in resampler.resample(frame):
                    piece = out.to_ndarray().reshape(-1)
                    count += len(piece)
                    if count > max_samples:
                        raise _not_audio(
                            f"the audio is longer than the limit of {limits.max_seconds:g} seconds"
                        )
                    pieces.append(piece)
            source_format = container.format.name
    except LllmsError:
        raise
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError) as error:
        raise _not_audio(f"the file cannot be decoded as audio: {error}") from None
    if not count:
        raise _not_audio("the audio file holds no sound")
    samples = np.concatenate(pieces).astype(np.float32, copy=False)
    return DecodedAudio(
        samples=samples, sample_rate=sample_rate, source_format=source_format, source_rate=rate, source_channels=channels
    )


async def decode(data: bytes, sample_rate: int = 16000, limits: AudioConfig | None = None) -> DecodedAudio:
    """:func:`decode_audio` in a worker thread."""
    return await trio.to_thread.run_sync(decode_audio, data, sample_rate, limits, limiter=_limiter())


class _Collector:
    """A write-only, unseekable file for FFmpeg's muxers: what they write is taken in pieces,
    so audio goes out as it is encoded (headers that would need a seek say "unknown length")."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data) -> int:
        self.buffer += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class AudioEncoder:
    """Encodes 16-bit mono PCM at ``sample_rate`` into a speech format, a piece at a
    time: :meth:`encode` returns the bytes ready so far, :meth:`finish` the rest.
    Blocking: run it in a worker thread (see :class:`StreamEncoder`)."""

    def __init__(self, response_format: SpeechFormat, sample_rate: int):
        import av

        self.format = response_format
        self.sample_rate = sample_rate
        self.samples = 0
        if response_format == "pcm":
            self.resampler = av.AudioResampler(format="s16", layout="mono", rate=PCM_RATE)
            return
        container_format, codec, rate = _ENCODINGS[response_format]
        self.output = _Collector()
        # ogg: a page per 0.1 s instead of per second, so opus streams without a second's delay
        options = {"page_duration": "100000"} if container_format == "ogg" else {}
        self.container = av.open(self.output, mode="w", format=container_format, container_options=options)
        self.stream = self.container.add_stream(codec, rate=rate or sample_rate, layout="mono")

    def _frame(self, pcm: bytes):
        import av
        import numpy as np

        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self.samples
        self.samples += samples.shape[1]
        return frame

    def encode(self, pcm: bytes) -> bytes:
        if not pcm:
            return b""
        frame = self._frame(pcm)
        if self.format == "pcm":
            return b"".join(out.to_ndarray().tobytes() for out in self.resampler.resample(frame))
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        return self.output.take()

    def finish(self) -> bytes:
        if self.format == "pcm":
            return b"".join(out.to_ndarray().tobytes() for out in self.resampler.resample(None))
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        return self.output.take()


class StreamEncoder:
    """Encodes a stream of :class:`~lllms_core.schemas.AudioChunk`s as they come, each piece
    in a worker thread; the first chunk's rate is the audio's. From trio."""

    def __init__(self, response_format: SpeechFormat):
        self.format = response_format
        self._encoder: AudioEncoder | None = None

    async def encode(self, chunk: "AudioChunk") -> bytes:
        if self._encoder is None:
            self._encoder = await trio.to_thread.run_sync(
                AudioEncoder, self.format, chunk.sample_rate, limiter=_limiter()
            )
        return await trio.to_thread.run_sync(self._encoder.encode, chunk.pcm, limiter=_limiter())

    async def finish(self) -> bytes:
        """The rest of the audio (nothing if no chunk came)."""
        if self._encoder is None:
            return b""
        return await trio.to_thread.run_sync(self._encoder.finish, limiter=_limiter())
