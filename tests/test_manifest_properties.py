"""Property-based: manifests with random missing and bad values never crash validation, and
the report accounts for every value."""

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modalforge.data.infer import infer_schema
from modalforge.data.manifest import is_missing, read_manifest, write_manifest
from modalforge.data.validate import apply_policy, validate_manifest
from modalforge.schema import Schema

from .conftest import png_bytes

IMAGE_VALUES = st.sampled_from(["ok.png", "bad.png", "gone.png", "../x.png", "", None])
TEXT_VALUES = st.one_of(st.none(), st.text(max_size=12))
NUM_VALUES = st.one_of(st.none(), st.floats(allow_nan=True), st.sampled_from(["1.5", "x"]))
LABEL_VALUES = st.one_of(st.none(), st.sampled_from(["a", "b", "c"]))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(IMAGE_VALUES, TEXT_VALUES, NUM_VALUES, LABEL_VALUES), min_size=1, max_size=25
    ),
    fmt=st.sampled_from([".csv", ".jsonl", ".parquet"]),
)
def test_random_missing_values_never_crash(tmp_path_factory, rows, fmt):
    root = tmp_path_factory.mktemp("m")
    (root / "ok.png").write_bytes(png_bytes())
    (root / "bad.png").write_bytes(b"\x89PNG broken")
    frame = pd.DataFrame(rows, columns=["image", "text", "num", "label"])
    frame["num"] = frame["num"].astype(object).map(lambda v: None if v is None else str(v))
    m = read_manifest(write_manifest(frame, root / f"m{fmt}"))
    schema = Schema.from_specs(["image=image?", "text=text?", "num=tabular?", "label=label"])
    report = validate_manifest(m, schema)
    # every (row, column) is either usable, missing-and-optional, or one reported problem
    for column in schema:
        values = m.frame[column.name].tolist()
        problems = {p.row for p in report.problems if p.column == column.name}
        missing_ok = sum(is_missing(v) for v in values) if not column.required else 0
        assert report.present[column.name] + len(problems) + missing_ok == len(values)
    good = apply_policy(m, report, "skip")
    assert len(good) == len(m) - len(report.bad_rows)
    assert validate_manifest(good, schema).ok
    infer_schema(m)  # inference copes with the same mess
