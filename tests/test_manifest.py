import os

import pandas as pd
import pytest

from modalforge.data.manifest import (
    ManifestError,
    PathOutsideRoot,
    read_manifest,
    resolve_path,
    write_manifest,
)

FRAME = pd.DataFrame(
    {"image": ["a.png", "b.png"], "text": ["NA", None], "score": [1.5, 2.0], "label": ["x", "y"]}
)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_each_format_round_trips(tmp_path, suffix):
    path = write_manifest(FRAME, tmp_path / f"m{suffix}")
    m = read_manifest(path)
    assert m.columns == ["image", "text", "score", "label"]
    assert m.root == tmp_path and len(m) == 2
    assert m.frame["text"][0] == "NA"  # the text "NA" is data, not a missing value
    assert pd.isna(m.frame["text"][1])
    assert m.frame["score"].tolist() == [1.5, 2.0]


def test_unreadable_manifests_raise_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="unknown manifest format"):
        read_manifest(tmp_path / "m.txt")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "m.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{not json\n')
    with pytest.raises(ManifestError, match=r"bad\.jsonl"):
        read_manifest(bad)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="UTF-8"):
        read_manifest(latin)


def test_paths_stay_under_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "x.png").write_bytes(b"x")
    assert resolve_path(root, "sub/x.png") == (root / "sub" / "x.png").resolve()
    assert resolve_path(root, str(root / "sub" / "x.png")) == (root / "sub" / "x.png").resolve()
    assert resolve_path(root, "sub/../sub/x.png").name == "x.png"
    for bad in [
        "../../etc/passwd",
        "/etc/passwd",
        "sub/../../outside.png",
        "https://example.invalid/a.png",
        "file:///etc/passwd",
    ]:
        with pytest.raises(PathOutsideRoot):
            resolve_path(root, bad)
    os.symlink("/etc", root / "escape")
    with pytest.raises(PathOutsideRoot, match="outside"):
        resolve_path(root, "escape/passwd")


def test_describe_row_uses_file_line_numbers(tmp_path):
    m = read_manifest(write_manifest(FRAME, tmp_path / "m.csv"))
    assert m.describe_row(0) == "row 0 (line 2)"
    m = read_manifest(write_manifest(FRAME, tmp_path / "m.jsonl"))
    assert m.describe_row(0) == "row 0 (line 1)"
