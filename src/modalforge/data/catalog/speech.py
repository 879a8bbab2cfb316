"""Spoken audio from espeak-ng (Debian package), with voice, speed and pitch varied per sample."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import soundfile as sf

from modalforge.data.audio import SAMPLE_RATE, resample
from modalforge.data.catalog._common import stable_rng

# espeak-ng's own English voices (no mbrola needed) and its voice variants
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
          "en-029", "en-us-nyc")  # fmt: skip
VARIANTS = ("", "+m1", "+m3", "+m7", "+f1", "+f2", "+f3", "+f4")
SPEED_RANGE = (135, 190)  # words per minute
PITCH_RANGE = (30, 70)  # 0..99, espeak's default is 50


class MissingSystemDependency(RuntimeError):
    """A Debian package the dataset needs is not installed."""


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise MissingSystemDependency(
            "espeak-ng is not installed; it speaks the dataset's texts. "
            "Debian/Ubuntu: apt-get install espeak-ng (or run `make install` as root)"
        )
    return path


def pick_voice(key: str, seed: int = 0) -> dict[str, object]:
    """A deterministic voice / speed / pitch for ``key`` (the same key always sounds the same)."""
    rng = stable_rng("voice", seed, key)
    return {
        "voice": VOICES[rng.integers(len(VOICES))] + VARIANTS[rng.integers(len(VARIANTS))],
        "speed": int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
        "pitch": int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
    }


def speak(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50,
          sample_rate: int = SAMPLE_RATE) -> np.ndarray:  # fmt: skip
    """Synthesize ``text`` -> mono float32 wave at ``sample_rate``. The text goes in on stdin, so
    it can never be read as an option."""
    try:
        proc = subprocess.run(
            [espeak_binary(), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout"],
            input=text.encode("utf-8"),
            capture_output=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"espeak-ng took over 60 s for {text!r} with voice {voice}") from None
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        raise RuntimeError(
            f"espeak-ng failed for {text!r} with voice {voice}: "
            f"{proc.stderr.decode(errors='replace')}"
        )
    # espeak writes a streaming WAV whose header holds a placeholder length; libsndfile reads
    # the samples that are there.
    wave, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    return resample(wave.mean(axis=1), sr, sample_rate)
