"""The avdigits builder: a small (first 100 digits) build, checked file by file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image

from modalforge.data.catalog import BuildResult, avdigits
from modalforge.data.catalog._common import stable_rng
from modalforge.data.catalog.speech import MissingSystemDependency

LIMIT = 100
COLUMNS = ["id", "image", "audio", "label", "split", "source"]

needs_system = [
    pytest.mark.system,
    pytest.mark.skipif(
        shutil.which("espeak-ng") is None, reason="espeak-ng not installed (make install adds it)"
    ),
    pytest.mark.skipif(
        not avdigits.ASTERISK_DIR.is_dir(),
        reason=f"{avdigits.ASTERISK_DIR} missing: apt-get install asterisk-core-sounds-en-wav "
        "(make install adds it)",
    ),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, BuildResult]:
    out = tmp_path_factory.mktemp("avdigits")
    return out, avdigits.build_avdigits(out, seed=0, workers=2, limit=LIMIT)


class TestBuild:
    """One 100-row build (module fixture), then checks on it; each test is a few seconds."""

    pytestmark = needs_system

    def test_rows_columns_and_files(self, built):
        out, result = built
        assert not result.reused and result.n_rows == LIMIT
        assert result.manifest == out / "manifest.csv"
        frame = pd.read_csv(result.manifest, dtype=str, keep_default_na=False)
        assert list(frame.columns) == COLUMNS
        assert len(frame) == LIMIT and frame["id"].is_unique
        from sklearn.datasets import load_digits

        expected = [str(t) for t in load_digits().target[:LIMIT]]
        assert frame["label"].tolist() == expected
        assert set(frame["label"]) == {str(d) for d in range(10)}
        assert set(frame["split"]) <= {"train", "val", "test"}
        assert set(frame["source"]) <= {"asterisk", "espeak"}
        for image, audio in zip(frame["image"], frame["audio"], strict=True):
            assert image.startswith("images/") and image.endswith(".png")
            assert audio.startswith("audio/") and audio.endswith(".flac")
            assert (out / image).is_file() and (out / audio).is_file()

    def test_images_decode(self, built):
        out, _ = built
        frame = pd.read_csv(out / "manifest.csv", dtype=str)
        for path in frame["image"][:10]:
            with Image.open(out / path) as img:
                assert img.format == "PNG" and img.mode == "L"
                assert img.size == (avdigits.IMAGE["size"],) * 2
                assert np.asarray(img).std() > 0

    def test_audio_decodes_at_16k(self, built):
        out, _ = built
        frame = pd.read_csv(out / "manifest.csv", dtype=str)
        for path in frame["audio"][:10]:
            wave, sr = sf.read(out / path, dtype="float32")
            assert sr == 16_000 and wave.ndim == 1
            assert len(wave) == round(avdigits.AUDIO["clip_seconds"] * 16_000)
            assert 0.005 < np.sqrt(np.mean(wave**2)) < 0.5

    def test_dataset_json(self, built):
        out, _ = built
        meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
        assert meta["name"] == "avdigits" and meta["rows"] == LIMIT
        assert meta["recipe"]["limit"] == LIMIT and meta["recipe"]["image"] == avdigits.IMAGE
        assert sum(meta["class_counts"].values()) == LIMIT
        assert set(meta["licenses"]) and "CC-BY-SA-3.0" in json.dumps(meta["licenses"])
        baselines = meta["baselines"]
        for name in ("image", "audio", "fused"):
            assert 0.0 <= baselines[f"{name}_accuracy"] <= 1.0
        assert baselines["n_test"] == (pd.read_csv(out / "manifest.csv")["split"] == "test").sum()

    def test_second_build_is_reused(self, built):
        out, _ = built
        before = (out / "dataset.json").stat().st_mtime_ns
        again = avdigits.build_avdigits(out, seed=0, workers=2, limit=LIMIT)
        assert again.reused and again.n_rows == LIMIT
        assert (out / "dataset.json").stat().st_mtime_ns == before

    def test_deterministic(self, built, tmp_path):
        out, _ = built
        other = avdigits.build_avdigits(tmp_path, seed=0, workers=1, limit=LIMIT)
        assert not other.reused
        assert (tmp_path / "manifest.csv").read_bytes() == (out / "manifest.csv").read_bytes()
        frame = pd.read_csv(out / "manifest.csv", dtype=str)
        for column in ("image", "audio"):
            for path in frame[column]:
                assert (tmp_path / path).read_bytes() == (out / path).read_bytes(), path
        meta = [json.loads((d / "dataset.json").read_text()) for d in (out, tmp_path)]
        assert meta[0]["baselines"] == meta[1]["baselines"]

    def test_changed_recipe_rebuilds(self, tmp_path):
        small = avdigits.build_avdigits(tmp_path, seed=0, workers=2, limit=12)
        assert not small.reused and small.n_rows == 12
        other_seed = avdigits.build_avdigits(tmp_path, seed=1, workers=2, limit=12)
        assert not other_seed.reused
        meta = json.loads((tmp_path / "dataset.json").read_text())
        assert meta["recipe"]["seed"] == 1
        assert "skipped" in meta["baselines"]  # 12 rows: no test split to score on


def test_missing_asterisk_sounds(tmp_path, monkeypatch):
    monkeypatch.setattr(avdigits, "ASTERISK_DIR", tmp_path / "no-such-dir")
    with pytest.raises(
        MissingSystemDependency, match="apt-get install asterisk-core-sounds-en-wav"
    ):
        avdigits.build_avdigits(tmp_path / "out", limit=5)
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_degrade_image_is_seeded():
    digit = np.zeros((8, 8))
    digit[1:7, 3:5] = 16.0
    a = avdigits.degrade_image(digit, stable_rng("t", 1))
    b = avdigits.degrade_image(digit, stable_rng("t", 1))
    c = avdigits.degrade_image(digit, stable_rng("t", 2))
    assert a.shape == (28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    clean = avdigits.degrade_image(
        digit, stable_rng("t", 1), {**avdigits.IMAGE, "noise_std": 0.0, "erase_area": [0.0, 0.0]}
    )
    assert clean[:, :4].max() == 0 and clean.max() == 255


def test_noisy_clip_snr_and_length():
    t = np.arange(8000) / 16_000
    word = np.sin(2 * np.pi * 300 * t)
    pool = [("asterisk", word), ("espeak", word)]
    params = {**avdigits.AUDIO, "snr_db": [100.0, 100.0], "speed": [1.0, 1.0]}
    source, clip = avdigits.noisy_clip(pool, stable_rng("t", 0), params)
    assert source in {"asterisk", "espeak"}
    assert clip.dtype == np.float32 and len(clip) == 16_000
    assert (np.abs(clip) > 1e-3).sum() < 8_100  # the word only, in silence


def test_noise_generators_unit_rms_and_seeded():
    pink = avdigits.pink_noise(stable_rng("t", 0), 16_000)
    assert np.sqrt(np.mean(pink**2)) == pytest.approx(1.0)
    power = np.abs(np.fft.rfft(pink)) ** 2  # 1 Hz bins: 1/f, so low bands carry more power
    assert power[100:200].mean() > 5 * power[4000:5000].mean()
    t = np.arange(4000) / 16_000
    pool = [[("espeak", np.sin(2 * np.pi * (200 + 50 * d) * t))] for d in range(10)]
    params = {**avdigits.AUDIO, "babble_talkers": [2, 4]}
    a = avdigits.babble_noise(pool, stable_rng("t", 1), params, 16_000)
    b = avdigits.babble_noise(pool, stable_rng("t", 1), params, 16_000)
    assert np.array_equal(a, b) and np.sqrt(np.mean(a**2)) == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["white", "pink", "babble", "babble+pink"])
def test_noisy_clip_noise_kinds(kind):
    t = np.arange(8000) / 16_000
    pool = [[("espeak", np.sin(2 * np.pi * (200 + 50 * d) * t))] for d in range(10)]
    params = {**avdigits.AUDIO, "noise": kind, "snr_db": [0.0, 0.0], "speed": [1.0, 1.0]}
    _, clip = avdigits.noisy_clip(pool[3], stable_rng("t", 0), params, babble_pool=pool)
    _, again = avdigits.noisy_clip(pool[3], stable_rng("t", 0), params, babble_pool=pool)
    assert np.array_equal(clip, again) and len(clip) == 16_000
    assert (np.abs(clip) > 1e-4).sum() > 8_000  # the noise is there, not only the word
    with pytest.raises(ValueError, match="unknown noise kind"):
        avdigits.noisy_clip(pool[3], stable_rng("t", 0), {**params, "noise": "brown"})
