"""Sound made in the test itself: WAV files that any decoder reads."""

from __future__ import annotations

import io
import math
import struct
import wave


def tone_wav(seconds: float = 1.0, rate: int = 16000, channels: int = 1, frequency: float = 440.0) -> bytes:
    """A sine tone as a 16-bit PCM WAV file."""
    frames = int(seconds * rate)
    samples = (int(8000 * math.sin(2 * math.pi * frequency * n / rate)) for n in range(frames))
    output = io.BytesIO()
    with wave.open(output, "wb") as file:
        file.setnchannels(channels)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes(b"".join(struct.pack("<h", sample) * channels for sample in samples))
    return output.getvalue()
