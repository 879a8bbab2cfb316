"""The bad-manifest scenario of the foundation issue, and the policies."""

import json
from pathlib import Path

import pandas as pd
import pytest

import modalforge.data.validate as validate_mod
from modalforge.data.infer import infer_schema
from modalforge.data.manifest import read_manifest, write_manifest
from modalforge.data.validate import BadRowsError, apply_policy, validate_manifest
from modalforge.schema import Column, Modality, Schema

from .conftest import png_bytes, sine, wav_bytes


@pytest.fixture
def bad_manifest(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    root.mkdir()
    rows = []
    for i in range(12):
        (root / f"{i}.png").write_bytes(png_bytes(color=(i * 20, 0, 0)))
        (root / f"{i}.wav").write_bytes(wav_bytes(sine(300, 0.2)))
        rows.append(
            {"image": f"{i}.png", "text": f"text {i}", "audio": f"{i}.wav", "label": "ab"[i % 2]}
        )
    (root / "3.png").write_bytes(png_bytes()[:40])  # corrupt (truncated)
    (root / "4.png").write_bytes(b"GIF89a garbage")  # corrupt (bad payload)
    (root / "5.wav").unlink()  # missing audio file
    rows[6]["text"] = "   "  # empty text
    rows[7]["text"] = None  # missing text
    rows[8]["image"] = "../../etc/passwd"  # outside the root
    rows[9]["label"] = "zzz"  # unknown label (classes declared below)
    path = root / "manifest.csv"
    write_manifest(pd.DataFrame(rows), path)
    return path


SCHEMA = Schema(
    (
        Column("image", Modality.IMAGE),
        Column("text", Modality.TEXT),
        Column("audio", Modality.AUDIO),
        Column("label", Modality.LABEL, classes=("a", "b")),
    )
)


def test_report_names_every_bad_row(bad_manifest):
    report = validate_manifest(read_manifest(bad_manifest), SCHEMA)
    got = {(p.row, p.column, p.kind) for p in report.problems}
    assert got == {
        (3, "image", "undecodable"),
        (4, "image", "undecodable"),
        (5, "audio", "missing_file"),
        (6, "text", "empty_text"),
        (7, "text", "empty_text"),
        (8, "image", "outside_root"),
        (9, "label", "unknown_label"),
    }
    assert report.counts() == {
        "outside_root": 1,
        "missing_file": 1,
        "undecodable": 2,
        "empty_text": 2,
        "unknown_label": 1,
    }
    assert report.present["image"] == 9 and report.present["audio"] == 11
    lines = report.lines()
    assert any(line.startswith("row 8 (line 10), column image: outside_root") for line in lines)
    assert "7 bad" in report.summary()
    # an undecodable file is named, not only its row and line
    assert any(line.startswith("row 3 (line 5), column image: undecodable: 3.png: ")
               for line in lines), lines  # fmt: skip


def test_an_optional_column_may_be_absent_from_the_manifest(bad_manifest):
    """A column the schema marks optional and the manifest lacks is missing in every row; a
    required one is still refused, by name."""
    m = read_manifest(bad_manifest)
    m = type(m)(m.frame.drop(columns=["audio"]), m.root, m.path)
    optional = Schema(tuple(Column(c.name, c.modality, required=c.name != "audio",
                                   classes=c.classes) for c in SCHEMA))  # fmt: skip
    report = validate_manifest(m, optional)
    assert report.present["audio"] == 0
    assert not any(p.column == "audio" for p in report.problems)
    with pytest.raises(ValueError, match=r"schema columns not in the manifest: \['audio'\]"):
        validate_manifest(m, SCHEMA)


def test_skip_keeps_the_good_rows_and_fail_raises_with_the_report(bad_manifest):
    m = read_manifest(bad_manifest)
    report = validate_manifest(m, SCHEMA)
    good = apply_policy(m, report, "skip")
    assert len(good) == 5
    assert good.frame["image"].tolist() == ["0.png", "1.png", "2.png", "10.png", "11.png"]
    with pytest.raises(BadRowsError, match=r"7 bad") as info:
        apply_policy(m, report, "fail")
    assert info.value.report is report
    assert "outside_root" in str(info.value)


def test_nothing_outside_the_root_is_opened(bad_manifest, monkeypatch):
    opened: list[Path] = []
    real_image, real_audio = validate_mod.decode_image, validate_mod.decode_audio

    def spy_image(path, **kw):
        opened.append(Path(path))
        return real_image(path, **kw)

    def spy_audio(path, **kw):
        opened.append(Path(path))
        return real_audio(path, **kw)

    monkeypatch.setattr(validate_mod, "decode_image", spy_image)
    monkeypatch.setattr(validate_mod, "decode_audio", spy_audio)
    m = read_manifest(bad_manifest)
    validate_manifest(m, SCHEMA)
    root = bad_manifest.parent.resolve()
    assert opened and all(root in p.parents for p in opened)
    assert not any("passwd" in str(p) for p in opened)


def test_optional_columns_may_be_missing(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    frame = pd.DataFrame({"image": ["a.png", None], "text": ["x", "y"], "n": [1.0, "x"]})
    m = read_manifest(write_manifest(frame, tmp_path / "m.jsonl"))
    schema = Schema.from_specs(["image=image?", "text=text", "n=tabular?"])
    report = validate_manifest(m, schema)
    assert [(p.row, p.kind) for p in report.problems] == [(1, "bad_number")]
    assert report.present == {"image": 1, "text": 2, "n": 1}


def test_report_files(bad_manifest, tmp_path):
    report = validate_manifest(read_manifest(bad_manifest), SCHEMA)
    data = json.loads(report.write(tmp_path / "r.json").read_text())
    assert data["n_bad_rows"] == 7 and len(data["problems"]) == 7
    lines = report.write(tmp_path / "r.csv").read_text().splitlines()
    assert lines[0] == "row,where,column,kind,message" and len(lines) == 8


def test_inferred_schema_on_bad_manifest_still_types_columns(bad_manifest):
    schema = infer_schema(read_manifest(bad_manifest))
    assert schema["image"].modality is Modality.IMAGE
    assert schema["audio"].modality is Modality.AUDIO
    assert not schema["text"].required  # one value is missing
