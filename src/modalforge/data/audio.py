"""Audio preprocessing: WAV / FLAC / OGG / MP3 in, mono 16 kHz float32 waves and log-mels out.

Decoding goes through soundfile (libsndfile), resampling through soxr (a real band-limited
resampler), log-mel features through transformers' Whisper feature extractor. The header's
duration is checked before any sample is read, so an hour-long or lying file is refused cheaply.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from modalforge.data.errors import DecodeError

SAMPLE_RATE = 16_000
DEFAULT_MAX_DECODE_SECONDS = 600.0
MAX_CHANNELS = 8  # 7.1 surround; more is mixed down by nobody's microphone
MIN_RATE, MAX_RATE = 1_000, 384_000  # sample rates a file may declare
# WAV format tag -> the sample widths (bits) it may declare: PCM, IEEE float, A-law, mu-law
_WAV_WIDTHS = {1: (8, 16, 24, 32), 3: (32, 64), 6: (8,), 7: (8,)}
_WAV_EXTENSIBLE = 0xFFFE


@dataclass(frozen=True)
class AudioConfig:
    """sample_rate: what encoders get; clip_seconds: trim / zero-pad every clip to this length
    (None keeps the clip's own length); max_decode_seconds: files longer than this are refused."""

    sample_rate: int = SAMPLE_RATE
    clip_seconds: float | None = 4.0
    max_decode_seconds: float = DEFAULT_MAX_DECODE_SECONDS
    n_mels: int = 80

    def __post_init__(self) -> None:
        if self.sample_rate < 1000:
            raise ValueError(f"sample_rate {self.sample_rate} is too low")
        if self.clip_seconds is not None and self.clip_seconds <= 0:
            raise ValueError("clip_seconds must be positive")

    @property
    def clip_samples(self) -> int | None:
        return None if self.clip_seconds is None else round(self.clip_seconds * self.sample_rate)


# RIFF sizes that streaming writers (ffmpeg to a pipe, ...) put where the length is unknown
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


def check_wav_sizes(data: bytes, total: int | None = None) -> None:
    """Raise DecodeError when a RIFF/WAVE file's data chunk claims more bytes than the file
    holds, or its ``fmt`` chunk declares a sample width its format cannot have (a 3-bit PCM
    file, which libsndfile reads as 8-bit noise). libsndfile quietly decodes what is there; a
    header that lies is a truncated or forged upload, and is reported as such. ``data``: the
    file or its first bytes; ``total``: the file's size (default ``len(data)``)."""
    total = len(data) if total is None else total
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        available = total - pos - 8
        if chunk == b"fmt " and size >= 16 and pos + 24 <= len(data):
            _check_wav_format(data[pos + 8 : pos + 8 + min(size, 40)])
        if chunk == b"data":
            if size not in _UNKNOWN_SIZES and size > available:
                raise DecodeError(
                    f"WAV header says the audio data is {size:,} bytes but the file holds "
                    f"{available:,}: truncated, or a header that lies about its length"
                )
            return
        pos += 8 + size + (size & 1)


def _check_wav_format(fmt: bytes) -> None:
    tag, channels = int.from_bytes(fmt[0:2], "little"), int.from_bytes(fmt[2:4], "little")
    rate = int.from_bytes(fmt[4:8], "little")
    align, bits = int.from_bytes(fmt[12:14], "little"), int.from_bytes(fmt[14:16], "little")
    if tag == _WAV_EXTENSIBLE and len(fmt) >= 26:
        tag = int.from_bytes(fmt[24:26], "little")  # the sub-format GUID's first two bytes
    widths = _WAV_WIDTHS.get(tag)
    if widths is None:
        return  # ADPCM, GSM, ...: compressed formats with their own widths, libsndfile's call
    if bits not in widths:
        raise DecodeError(
            f"WAV header declares {bits}-bit samples, which its format (tag {tag}) cannot have "
            f"(it has {', '.join(map(str, widths))}-bit)"
        )
    if channels and align != channels * bits // 8:
        raise DecodeError(
            f"WAV header is inconsistent: {channels} channel(s) of {bits}-bit samples are "
            f"{channels * bits // 8} bytes a frame, but it says {align}"
        )
    if not MIN_RATE <= rate <= MAX_RATE:
        raise DecodeError(
            f"WAV header declares a sample rate of {rate:,} Hz (taken: {MIN_RATE:,} to "
            f"{MAX_RATE:,} Hz)"
        )


def decode_audio(
    source: bytes | str | Path, max_seconds: float = DEFAULT_MAX_DECODE_SECONDS
) -> tuple[np.ndarray, int]:
    """Decode to a mono float32 wave in [-1, 1] and its sample rate. Raises DecodeError."""

    def _open():
        return io.BytesIO(source) if isinstance(source, bytes | bytearray) else source

    try:
        if isinstance(source, bytes | bytearray):
            check_wav_sizes(bytes(source))
        else:
            with open(source, "rb") as f:
                check_wav_sizes(f.read(65_536), Path(source).stat().st_size)
        info = sf.info(_open())
        if not MIN_RATE <= info.samplerate <= MAX_RATE:
            raise DecodeError(
                f"sample rate {info.samplerate:,} Hz is outside {MIN_RATE:,} to {MAX_RATE:,} Hz"
            )
        if not 1 <= info.channels <= MAX_CHANNELS:
            raise DecodeError(
                f"audio has {info.channels} channels; at most {MAX_CHANNELS} are mixed down to mono"
            )
        if info.frames > max_seconds * info.samplerate:
            raise DecodeError(
                f"audio is {info.frames / info.samplerate:,.1f} s long, over the limit of "
                f"{max_seconds:g} s"
            )
        data, sr = sf.read(_open(), dtype="float32", always_2d=True,
                           frames=int(max_seconds * info.samplerate) + 1)  # fmt: skip
    except DecodeError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError, EOFError) as err:
        # libsndfile's message names the BytesIO object: keep only what it says is wrong
        reason = str(err).rsplit(": ", 1)[-1] if "Error opening" in str(err) else str(err)
        raise DecodeError(f"cannot decode audio: {reason}") from None
    if data.shape[0] == 0:
        raise DecodeError("audio has no samples")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wave).all():
        raise DecodeError("audio contains NaN or infinite samples")
    return np.ascontiguousarray(wave, dtype=np.float32), int(sr)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling with soxr ('HQ'). (T,) float32 -> (T * target / orig,) float32."""
    if orig_sr == target_sr:
        return wave.astype(np.float32, copy=False)
    return soxr.resample(wave, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def fit_length(wave: np.ndarray, n: int | None) -> np.ndarray:
    """Trim or zero-pad (at the end) to exactly ``n`` samples; ``None`` returns the wave as is."""
    if n is None or len(wave) == n:
        return wave
    if len(wave) > n:
        return wave[:n]
    return np.pad(wave, (0, n - len(wave)))


def load_audio(source: bytes | str | Path, cfg: AudioConfig = AudioConfig()) -> np.ndarray:
    """Decode + mono + resample to ``cfg.sample_rate`` + trim / pad -> (T,) float32."""
    wave, sr = decode_audio(source, cfg.max_decode_seconds)
    return fit_length(resample(wave, sr, cfg.sample_rate), cfg.clip_samples)


@functools.lru_cache(maxsize=4)
def whisper_feature_extractor(n_mels: int = 80, sample_rate: int = SAMPLE_RATE):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=sample_rate)


def log_mel(
    waves: list[np.ndarray] | np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    n_mels: int = 80,
    pad_to_30s: bool = False,
) -> torch.Tensor:
    """Whisper-style log-mel spectrogram -> (B, n_mels, frames) float32, 100 frames per second.

    ``pad_to_30s`` gives the 3000 frames the stock Whisper encoder insists on; otherwise the
    batch is padded to its longest clip (trimmed-window encoders, from-scratch audio CNNs).
    Each clip is computed on its own and padded with its own floor value (Whisper clamps every
    clip at its max - 8), so a clip's features never depend on the rest of the batch.
    """
    if isinstance(waves, np.ndarray) and waves.ndim == 1:
        waves = [waves]
    fe = whisper_feature_extractor(n_mels, sample_rate)
    feats = [
        fe(
            np.asarray(w, dtype=np.float32),
            sampling_rate=sample_rate,
            padding="max_length" if pad_to_30s else "longest",
            return_tensors="np",
        ).input_features[0]
        for w in waves
    ]
    width = max(f.shape[-1] for f in feats)
    out = np.stack(
        [np.pad(f, ((0, 0), (0, width - f.shape[-1])), constant_values=f.min()) for f in feats]
    )
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
