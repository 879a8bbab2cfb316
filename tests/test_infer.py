import json

import pandas as pd
import pytest

from modalforge.data.infer import infer_schema
from modalforge.data.manifest import read_manifest, write_manifest
from modalforge.schema import Modality, Schema

from .conftest import png_bytes, sine, wav_bytes


def test_infers_each_modality(mixed_manifest):
    m = read_manifest(mixed_manifest)
    schema = infer_schema(m)
    assert {c.name: c.modality for c in schema} == {
        "image": Modality.IMAGE,
        "text": Modality.TEXT,
        "audio": Modality.AUDIO,
        "label": Modality.LABEL,
    }
    assert all(c.required for c in schema)


def test_content_sniffing_without_extensions(tmp_path):
    for i in range(4):
        (tmp_path / f"pic{i}").write_bytes(png_bytes())
        (tmp_path / f"snd{i}").write_bytes(wav_bytes(sine()))
        graph = {"x": [[1.0], [2.0]], "edges": [[0, 1]]}
        (tmp_path / f"g{i}").write_text(json.dumps(graph))
    frame = pd.DataFrame(
        {
            "a": [f"pic{i}" for i in range(4)],
            "b": [f"snd{i}" for i in range(4)],
            "c": [f"g{i}" for i in range(4)],
            "age": [1, 2, None, 4],
            "id": ["p", "q", "r", "s"],
        }
    )
    m = read_manifest(write_manifest(frame, tmp_path / "m.parquet"))
    schema = infer_schema(m)
    assert schema["a"].modality is Modality.IMAGE
    assert schema["b"].modality is Modality.AUDIO
    assert schema["c"].modality is Modality.GRAPH
    assert schema["age"].modality is Modality.TABULAR and not schema["age"].required
    assert "id" not in schema  # metadata


def test_low_cardinality_strings_are_labels_and_declared_columns_win(tmp_path):
    n = 40
    frame = pd.DataFrame(
        {
            "caption": [f"a picture of thing number {i}" for i in range(n)],
            "kind": ["cat", "dog"] * (n // 2),
        }
    )
    m = read_manifest(write_manifest(frame, tmp_path / "m.csv"))
    assert infer_schema(m)["kind"].modality is Modality.LABEL
    assert infer_schema(m)["caption"].modality is Modality.TEXT
    declared = Schema.from_specs(["kind=text?"])
    schema = infer_schema(m, declared=declared)
    assert schema["kind"].modality is Modality.TEXT and not schema["kind"].required
    assert infer_schema(m, label="caption")["caption"].modality is Modality.LABEL
    with pytest.raises(ValueError, match="not in the manifest"):
        infer_schema(m, label="nope")


def test_metadata_columns_are_never_typed(tmp_path):
    frame = pd.DataFrame({"group": ["x"], "split": ["train"], "_note": ["n"], "source": ["s"]})
    m = read_manifest(write_manifest(frame, tmp_path / "m.csv"))
    assert len(infer_schema(m)) == 0
