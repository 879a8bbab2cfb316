"""Dataset builders on a synthetic package tarball (no download at test time)."""

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import soundfile as sf

from modalforge.data.catalog import build_dataset, emoji, list_datasets, npm
from modalforge.data.catalog.speech import pick_voice, speak

from .conftest import png_bytes, requires


def make_package(path: Path) -> Path:
    entries = [
        {"name": "GRINNING FACE", "unified": "1F600", "image": "1f600.png", "category": "Smileys & Emotion",
         "subcategory": "face-smiling", "sort_order": 1, "has_img_google": True},
        {"name": "WAVING HAND SIGN", "unified": "1F44B", "image": "1f44b.png", "category": "People & Body",
         "subcategory": "hand-fingers-open", "sort_order": 2, "has_img_google": True,
         "skin_variations": {"1F3FB": {"unified": "1F44B-1F3FB", "image": "1f44b-1f3fb.png",
                                       "has_img_google": True}}},
        {"name": "Egypt Flag", "unified": "1F1EA-1F1EC", "image": "1f1ea-1f1ec.png", "category": "Flags",
         "subcategory": "country-flag", "sort_order": 3, "has_img_google": True},
        {"name": "EMOJI MODIFIER FITZPATRICK TYPE-3", "unified": "1F3FC", "image": "1f3fc.png",
         "category": "Component", "subcategory": "skin-tone", "sort_order": 4, "has_img_google": True},
        {"name": "NO GOOGLE IMAGE", "unified": "1F999", "image": "1f999.png", "category": "Objects",
         "subcategory": "tool", "sort_order": 5, "has_img_google": False},
    ]  # fmt: skip
    files = {"package/emoji.json": json.dumps(entries).encode()}
    for e in entries[:4]:
        files[f"package/img/google/64/{e['image']}"] = png_bytes((64, 64))
    files["package/img/google/64/1f44b-1f3fb.png"] = png_bytes((64, 64), (90, 60, 30))
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_emoji_row_selection_rules(tmp_path):
    tgz = make_package(tmp_path / "pkg.tgz")
    entries, images = emoji._read_package(tgz)
    default = emoji.emoji_rows(entries, include_flags=False, variants=False)
    assert [r["text"] for r in default] == ["grinning face", "waving hand sign"]
    with_all = emoji.emoji_rows(entries, include_flags=True, variants=True)
    texts = [r["text"] for r in with_all]
    assert texts == [
        "grinning face",
        "waving hand sign",
        "waving hand sign: light skin tone",
        "egypt flag",
    ]
    assert with_all[2]["group"] == with_all[1]["group"] == "1F44B"
    assert set(images) >= {r["image_file"] for r in with_all}


@requires("espeak-ng")
@pytest.mark.system
def test_emoji_build_is_idempotent_and_checks_integrity(tmp_path, monkeypatch):
    tgz = make_package(tmp_path / "pkg.tgz")
    with pytest.raises(npm.IntegrityError, match="pinned"):
        emoji.build_emoji(tmp_path / "out", tarball=tgz)
    monkeypatch.setattr(emoji, "INTEGRITY", npm.sri_sha512(tgz))
    out = tmp_path / "out"
    first = emoji.build_emoji(out, tarball=tgz, variants=True, workers=2)
    assert not first.reused and first.n_rows == 3
    frame = pd.read_csv(first.manifest)
    assert list(frame.columns) == [
        "id",
        "image",
        "text",
        "audio",
        "category",
        "subcategory",
        "group",
        "split",
    ]
    for rel in frame["audio"]:
        info = sf.info(out / rel)
        assert info.samplerate == 16_000 and info.channels == 1 and info.duration > 0.2
    # the variant stays with its base emoji
    assert frame.loc[frame["group"] == "1F44B", "split"].nunique() == 1
    stamp = (out / frame["audio"][0]).stat().st_mtime_ns
    second = emoji.build_emoji(out, tarball=tgz, variants=True)
    assert second.reused and (out / frame["audio"][0]).stat().st_mtime_ns == stamp
    # a deleted file makes the build incomplete: only that file is made again
    (out / frame["audio"][1]).unlink()
    third = emoji.build_emoji(out, tarball=tgz, variants=True)
    assert not third.reused and (out / frame["audio"][1]).is_file()
    assert (out / frame["audio"][0]).stat().st_mtime_ns == stamp
    # another seed means other voices: no file of the old recipe survives
    before = (out / frame["audio"][0]).read_bytes()
    fourth = emoji.build_emoji(out, tarball=tgz, variants=True, seed=7)
    assert not fourth.reused and (out / frame["audio"][0]).read_bytes() != before


def test_fetch_tarball_verifies_and_replaces_tampered_cache(tmp_path, monkeypatch):
    good = make_package(tmp_path / "src.tgz")
    integrity = npm.sri_sha512(good)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "pkg-1.0.0.tgz").write_bytes(b"tampered")
    calls = []

    def fake_npm(spec, workdir):
        calls.append(spec)
        target = workdir / "pkg-1.0.0.tgz"
        target.write_bytes(good.read_bytes())
        return target

    monkeypatch.setattr(npm, "_via_npm", fake_npm)
    got = npm.fetch_tarball("pkg", "1.0.0", integrity, cache, use_npm=True)
    assert calls == ["pkg@1.0.0"] and npm.sri_sha512(got) == integrity
    npm.fetch_tarball("pkg", "1.0.0", integrity, cache, use_npm=True)
    assert calls == ["pkg@1.0.0"]  # cached and verified: no second fetch
    with pytest.raises(npm.IntegrityError):
        npm.fetch_tarball("pkg", "2.0.0", "sha512-AAAA", cache, use_npm=True)
    assert not (cache / "pkg-2.0.0.tgz").exists()


def test_sri_matches_npm_format(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    # sha512("abc") in base64, as npm's integrity field spells it
    assert npm.sri_sha512(path) == (
        "sha512-3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw=="
    )


def test_registry():
    names = [d.name for d in list_datasets()]
    assert "emoji" in names and "avdigits" in names
    with pytest.raises(KeyError, match="unknown dataset"):
        build_dataset("nope", "/tmp/x")


@requires("espeak-ng")
@pytest.mark.system
def test_speak_is_deterministic_16k():
    voice = pick_voice("1F600")
    assert voice == pick_voice("1F600")
    assert len({pick_voice(f"id{i}")["voice"] for i in range(50)}) >= 10  # voices vary
    a = speak("grinning face", **voice)
    b = speak("grinning face", **voice)
    assert a.dtype.name == "float32" and 0.3 * 16_000 < len(a) < 4 * 16_000
    assert (a == b).all() and abs(a).max() > 0.05
