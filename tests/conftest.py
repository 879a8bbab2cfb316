"""Shared fixtures: tiny images, clips and manifests made in the test, never downloaded."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image


def png_bytes(size=(30, 20), color=(200, 40, 40), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG signature + IHDR for width x height, and no pixel data worth the name."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def sine(freq: float = 440.0, seconds: float = 0.5, sr: int = 16_000) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_bytes(wave: np.ndarray, sr: int = 16_000, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt)
    return buf.getvalue()


# the toy task of the training, serving and export tests: 3 classes that show in the image
# colour, in the words and in the tone's pitch
COLORS = {"r": (220, 30, 30), "g": (30, 220, 30), "b": (30, 30, 220)}
WORDS = {"r": "red apple", "g": "green leaf", "b": "blue sea"}
PITCH = {"r": 300, "g": 600, "b": 900}


def shade(colour: str, i: int) -> tuple[int, ...]:
    """Row ``i``'s version of ``COLORS[colour]``: each channel moved by -15..+15 in steps of 5."""
    return tuple(min(255, max(0, v + (i % 7) * 5 - 15)) for v in COLORS[colour])


def write_toy_manifest(root: Path, inputs=("image", "text", "audio"), rows: int = 60) -> Path:
    """``rows`` rows of the toy task under ``root`` (img/, aud/, manifest.csv) -> the manifest."""
    (root / "img").mkdir(exist_ok=True)
    (root / "aud").mkdir(exist_ok=True)
    records = []
    for i in range(rows):
        c = "rgb"[i % 3]
        record = {}
        if "image" in inputs:
            (root / "img" / f"{i}.png").write_bytes(png_bytes((30, 30), COLORS[c]))
            record["image"] = f"img/{i}.png"
        if "text" in inputs:
            record["text"] = f"a {WORDS[c]} {i}"
        if "audio" in inputs:
            (root / "aud" / f"{i}.wav").write_bytes(wav_bytes(sine(PITCH[c], 0.25)))
            record["audio"] = f"aud/{i}.wav"
        record["label"] = c
        records.append(record)
    path = root / "manifest.csv"
    pd.DataFrame(records).to_csv(path, index=False)
    return path


@pytest.fixture
def mixed_manifest(tmp_path: Path) -> Path:
    """A 6-row CSV manifest with image, text, audio and label columns, all good."""
    (tmp_path / "img").mkdir()
    (tmp_path / "aud").mkdir()
    rows = ["image,text,audio,label"]
    for i in range(6):
        (tmp_path / "img" / f"{i}.png").write_bytes(png_bytes(color=(40 * i, 10, 10)))
        (tmp_path / "aud" / f"{i}.wav").write_bytes(wav_bytes(sine(200 + 50 * i, 0.3)))
        rows.append(f"img/{i}.png,sample number {i},aud/{i}.wav,{'ab'[i % 2]}")
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def requires(binary: str):
    return pytest.mark.skipif(
        shutil.which(binary) is None, reason=f"{binary} not installed (make install adds it)"
    )


@pytest.fixture(scope="session")
def classifier_bundle(tmp_path_factory) -> Path:
    """The serving tests' tiny classifier (``tests/serving.py``), built once for the session:
    the fuzz and soak tests share it."""
    from .serving import train_toy_bundle

    return train_toy_bundle(tmp_path_factory.mktemp("classifier"))


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray of 2 CPUs for the scale-out tests, shared by them, shut down at the end.

    Nothing goes into the home folder: Ray's token authentication stays on, with a token given
    in the environment (Ray would otherwise generate one into ~/.ray/auth_token), usage stats
    are off, and the session files live in a temporary folder (short: Ray's sockets live there).
    """
    import os
    import secrets
    import tempfile

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                            "RAY_USAGE_STATS_ENABLED")}  # fmt: skip
    # before ray is imported: its token loader reads the environment once
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
                      RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (make installs it)")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
             _temp_dir=temp, log_to_driver=False)  # fmt: skip
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
