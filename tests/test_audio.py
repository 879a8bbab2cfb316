import numpy as np
import pytest
import soundfile as sf
import torch

from modalforge.data.audio import (
    AudioConfig,
    decode_audio,
    fit_length,
    load_audio,
    log_mel,
    resample,
)
from modalforge.data.errors import DecodeError

from .conftest import sine, wav_bytes


def dominant_hz(wave: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(len(wave), 1 / sr)[spectrum.argmax()])


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_formats_decode_mono_and_resample_to_16k(fmt):
    sr = 22_050
    stereo = np.stack([sine(440, 1.0, sr), sine(440, 1.0, sr)], axis=1)
    wave = load_audio(wav_bytes(stereo, sr, fmt), AudioConfig(clip_seconds=None))
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - 16_000) < 1200  # mp3 adds encoder delay / padding
    assert abs(dominant_hz(wave, 16_000) - 440) < 3


def test_resampler_is_band_limited():
    # a 7 kHz tone is below the 8 kHz Nyquist of 16 kHz audio and must survive;
    # a 10 kHz tone is above it and must be filtered out, not aliased to 6 kHz.
    sr = 44_100
    keep = resample(sine(7000, 1.0, sr), sr, 16_000)
    assert abs(dominant_hz(keep, 16_000) - 7000) < 3
    gone = resample(sine(10_000, 1.0, sr), sr, 16_000)
    assert np.abs(gone[400:-400]).max() < 0.01  # away from the edges' onset transients
    assert resample(keep, 16_000, 16_000) is keep


def test_fit_length_trims_and_pads():
    x = np.arange(5, dtype=np.float32)
    assert fit_length(x, 3).tolist() == [0, 1, 2]
    assert fit_length(x, 7).tolist() == [0, 1, 2, 3, 4, 0, 0]
    assert fit_length(x, None) is x
    clip = load_audio(wav_bytes(sine(300, 0.2)), AudioConfig(clip_seconds=1.0))
    assert clip.shape == (16_000,) and np.all(clip[4000:] == 0)


def test_log_mel_shapes_and_golden_silence():
    feats = log_mel([sine(440, 1.0), sine(880, 0.5)])
    assert feats.shape == (2, 80, 100)  # 100 frames per second, padded to the longest
    assert log_mel(sine(440, 1.0), pad_to_30s=True).shape == (1, 80, 3000)
    # silence: log10 of the 1e-10 floor = -10 everywhere, then (x + 4) / 4 = -1.5
    silence = log_mel(np.zeros(16_000, dtype=np.float32))
    assert float(silence.max() - silence.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(silence.mean()) == pytest.approx(-1.5, abs=1e-6)
    # a clip's features do not depend on what else is in the batch
    alone = log_mel([sine(880, 0.5)])
    assert torch.equal(feats[1, :, :50], alone[0])


def test_duration_guard_and_bad_audio():
    long = wav_bytes(np.zeros(16_000 * 5, dtype=np.float32))
    with pytest.raises(DecodeError, match="over the limit"):
        decode_audio(long, max_seconds=2)
    with pytest.raises(DecodeError, match="cannot decode"):
        decode_audio(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(DecodeError, match="no samples"):
        decode_audio(wav_bytes(np.zeros(0, dtype=np.float32)))


def test_header_that_lies_about_its_length(tmp_path):
    data = bytearray(wav_bytes(sine(440, 0.5)))
    good = bytes(data)
    data[40:44] = (10**9).to_bytes(4, "little")  # data chunk claims a gigabyte
    with pytest.raises(DecodeError, match="lies about its length"):
        decode_audio(bytes(data), max_seconds=60)
    (tmp_path / "lying.wav").write_bytes(bytes(data))
    with pytest.raises(DecodeError, match="1,000,000,000 bytes but the file holds 16,000"):
        decode_audio(tmp_path / "lying.wav")
    with pytest.raises(DecodeError, match="truncated"):
        decode_audio(good[:-100])
    # the "unknown length" marker of streaming writers is not a lie
    data[40:44] = (0xFFFFFFFF).to_bytes(4, "little")
    assert decode_audio(bytes(data))[0].shape == (8000,)
    path = tmp_path / "x.wav"
    sf.write(path, sine(), 16_000)
    assert decode_audio(path)[0].shape == (8000,)
