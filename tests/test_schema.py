import pytest

from modalforge.schema import Column, Modality, Schema, SchemaError


def test_specs_parse_types_and_optional_marker():
    schema = Schema.from_specs(["image=image,caption=text?", "y=label"])
    assert schema.names == ["image", "caption", "y"]
    assert schema["caption"].modality is Modality.TEXT and not schema["caption"].required
    assert schema["image"].required
    assert [c.name for c in schema.inputs] == ["caption", "image"]  # sorted, label excluded


@pytest.mark.parametrize("spec", ["image", "image=", "=text", "x=picture"])
def test_bad_specs_name_the_problem(spec):
    with pytest.raises(SchemaError, match=r"spec|unknown type"):
        Schema.from_specs([spec])


def test_yaml_round_trip(tmp_path):
    schema = Schema(
        (
            Column("img", Modality.IMAGE),
            Column("snd", Modality.AUDIO, required=False),
            Column("cls", Modality.LABEL, classes=("a", "b")),
        )
    )
    path = tmp_path / "schema.yaml"
    path.write_text(schema.to_yaml())
    assert Schema.from_yaml(path) == schema


def test_yaml_short_form_and_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("columns:\n  photo: image\n  note: text?\n")
    schema = Schema.from_yaml(path)
    assert schema["photo"].modality is Modality.IMAGE and not schema["note"].required
    path.write_text("columns:\n  photo: {type: image, classes: [a]}\n")
    with pytest.raises(SchemaError, match=r"photo.*only allowed on label"):
        Schema.from_yaml(path)
    path.write_text("columns: [1, 2\n")
    with pytest.raises(SchemaError, match=r"s\.yaml"):
        Schema.from_yaml(path)


def test_duplicate_columns_rejected():
    with pytest.raises(SchemaError, match="twice"):
        Schema((Column("a", Modality.TEXT), Column("a", Modality.IMAGE)))
