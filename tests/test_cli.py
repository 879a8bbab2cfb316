import pandas as pd
import yaml
from typer.testing import CliRunner

from modalforge.cli import app

from .test_validate import bad_manifest  # noqa: F401  (fixture)

runner = CliRunner()


def test_help_explains_itself():
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0 and "data" in out.output and "manifest" in out.output
    out = runner.invoke(app, ["data", "--help"])
    assert out.exit_code == 0
    for command in ("build", "inspect", "validate", "schema", "split", "list"):
        assert command in out.output
    out = runner.invoke(app, ["data", "build", "--help"])
    assert out.exit_code == 0 and "--out" in out.output and "espeak-ng" in out.output


def test_schema_prints_yaml(mixed_manifest):
    out = runner.invoke(app, ["data", "schema", str(mixed_manifest), "--column", "text=text?"])
    assert out.exit_code == 0, out.output
    data = yaml.safe_load(out.stdout)
    assert data["columns"]["image"] == {"type": "image", "required": True}
    assert data["columns"]["text"] == {"type": "text", "required": False}


def test_validate_fail_and_skip(bad_manifest, tmp_path):  # noqa: F811
    args = ["data", "validate", str(bad_manifest), "-c", "label=label", "-c", "text=text"]
    out = runner.invoke(app, args)
    assert out.exit_code == 1
    assert "row 8 (line 10), column image: outside_root" in out.output
    assert "column audio: missing_file" in out.output
    clean = bad_manifest.parent / "clean.csv"
    report = tmp_path / "problems.csv"
    out = runner.invoke(
        app, [*args, "--on-bad-row", "skip", "--clean", str(clean), "--report", str(report)]
    )
    assert out.exit_code == 0, out.output
    assert len(pd.read_csv(clean)) == 6  # unknown labels are not checked without declared classes
    assert len(report.read_text().splitlines()) == 1 + 6
    out = runner.invoke(app, [*args, "--on-bad-row", "maybe"])
    assert out.exit_code == 1 and "skip or fail" in out.output


def test_inspect_writes_contact_sheet(mixed_manifest, tmp_path):
    out = runner.invoke(
        app, ["data", "inspect", str(mixed_manifest), "--out", str(tmp_path / "insp")]
    )
    assert out.exit_code == 0, out.output
    assert "schema" in out.output and "6 rows" in out.output
    sheet = tmp_path / "insp" / "contact_sheet.png"
    from PIL import Image

    with Image.open(sheet) as img:
        assert img.width > 100 and img.height > 100
    assert (tmp_path / "insp" / "inspection.json").is_file()


def test_split_command(mixed_manifest, tmp_path):
    target = tmp_path / "split.csv"
    out = runner.invoke(app, ["data", "split", str(mixed_manifest), "--label", "label", "--out", str(target),
                              "--fractions", "0.5,0.25,0.25"])  # fmt: skip
    assert out.exit_code == 0, out.output
    frame = pd.read_csv(target)
    assert set(frame["split"]) <= {"train", "val", "test"} and len(frame) == 6
    out = runner.invoke(
        app, ["data", "split", str(mixed_manifest), "--label", "nope", "--out", str(target)]
    )
    assert out.exit_code == 1 and "nope" in out.output


def test_unknown_dataset_and_bad_manifest_are_clear_errors(tmp_path):
    out = runner.invoke(app, ["data", "build", "nope", "--out", str(tmp_path)])
    assert out.exit_code == 1 and "unknown dataset" in out.output
    out = runner.invoke(app, ["data", "inspect", str(tmp_path / "missing.csv")])
    assert out.exit_code == 1 and "not found" in out.output


def test_models_list_names_every_encoder_and_fusion():
    from modalforge.encoders import list_encoders
    from modalforge.fusion import list_fusions

    out = runner.invoke(app, ["models", "list", "--no-count"], terminal_width=200)
    assert out.exit_code == 0, out.output
    for info in [*list_encoders(), *list_fusions()]:
        assert info.name in out.output
    assert "[z; 1]" in out.output  # descriptions are printed literally, not as rich markup
    out = runner.invoke(app, ["models", "--help"])
    assert out.exit_code == 0 and "list" in out.output
