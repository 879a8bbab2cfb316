"""Batch inference over a manifest (issue 19, part 3): in-process streaming and Ray Data write
every good row with the model's prediction and report every bad row, naming its column."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from .conftest import png_bytes, write_toy_manifest

#: what each corrupt row is, and the column its error must name
BAD = {
    "truncated.png": "image",  # a PNG cut after 40 bytes
    "missing.png": "image",  # no such file
    "outside": "image",  # ../outside.png: a real file, outside the manifest's folder
    "symlink": "image",  # img/link.png -> that file outside
    "garbage.wav": "audio",  # not audio at all
}


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> Path:
    """30 good toy rows and one row per kind of BAD, with an ``id`` column, as Parquet (one
    file: one Ray block, which the Ray path must split)."""
    base = tmp_path_factory.mktemp("corrupt")
    root = base / "data"
    root.mkdir()
    frame = pd.read_csv(write_toy_manifest(root, rows=30))
    (base / "outside.png").write_bytes(png_bytes((30, 30)))
    (root / "img" / "truncated.png").write_bytes(png_bytes((30, 30))[:40])
    (root / "img" / "link.png").symlink_to(base / "outside.png")
    (root / "aud" / "garbage.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" * 20)
    good = frame.iloc[0]
    paths = {"truncated.png": "img/truncated.png", "missing.png": "img/missing.png",
             "outside": "../outside.png", "symlink": "img/link.png"}  # fmt: skip
    bad = [dict(good, image=path) for path in paths.values()]
    bad.append(dict(good, audio="aud/garbage.wav"))
    rows = pd.concat([frame.iloc[:12], pd.DataFrame(bad), frame.iloc[12:]], ignore_index=True)
    rows.insert(0, "id", [f"s{i:03d}" for i in range(len(rows))])
    path = root / "big.parquet"
    rows.to_parquet(path, index=False)
    return path


def bad_ids(manifest: Path) -> dict[str, str]:
    """id -> the column its error must name, for the BAD rows (rows 12..16)."""
    ids = pd.read_parquet(manifest)["id"].tolist()
    return dict(zip(ids[12:17], BAD.values(), strict=True))


def check_output(out: Path, manifest: Path, bundle: Path) -> pd.DataFrame:
    """Every row once; every good row's probabilities and contributions equal the bundle's own
    ``predict``; every bad row an error naming its column and nulls for results."""
    from modalforge import tasks

    got = pd.read_parquet(out)
    rows = pd.read_parquet(manifest)
    assert sorted(got["id"]) == sorted(rows["id"])
    got = got.set_index("id")
    expected_bad = bad_ids(manifest)
    failed = got[got["error"].notna()]
    assert set(failed.index) == set(expected_bad)
    for ident, column in expected_bad.items():
        assert failed.loc[ident, "error_column"] == column
        assert f"'{column}'" in failed.loc[ident, "error"]
        assert pd.isna(failed.loc[ident, "label"]) and pd.isna(failed.loc[ident, "p:r"])
    good = rows[~rows["id"].isin(expected_bad)].reset_index(drop=True)
    want = tasks.load(bundle).predict(good.drop(columns=["id"]), root=manifest.parent)
    mine = got.loc[good["id"]].reset_index(drop=True)
    assert mine["error"].isna().all()
    assert (mine["label"] == want["label"]).all()
    for c in [c for c in want if c.startswith(("p:", "contribution:")) or c == "confidence"]:
        np.testing.assert_allclose(mine[c].to_numpy(float), want[c].to_numpy(float), atol=1e-5,
                                   err_msg=c)  # fmt: skip
    return got


def test_in_process_writes_every_good_row_and_reports_every_bad_one(classifier_bundle, corrupt,
                                                                    tmp_path):  # fmt: skip
    from modalforge.runtime.batch import predict_manifest

    out = tmp_path / "scores.parquet"
    summary = predict_manifest(classifier_bundle, corrupt, out, batch_size=8, rows_per_shard=16,
                               progress=False)  # fmt: skip
    assert (summary.rows, summary.failed) == (35, 5) and summary.mode == "in-process"
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        f"part-0000{i}.parquet" for i in range(3)
    ]  # 16+16+3 rows
    assert json.loads((out / "_summary.json").read_text())["failed"] == 5
    got = check_output(out, corrupt, classifier_bundle)
    messages = got["error"].dropna()
    assert (
        "not found under" in messages["s013"] and "outside the manifest folder" in messages["s014"]
    )
    assert "outside the manifest folder" in messages["s015"]  # the symlink is followed first
    # a rerun replaces the folder it wrote; a folder of something else is refused
    predict_manifest(classifier_bundle, corrupt, out, batch_size=64, progress=False)
    assert [p.name for p in out.glob("*.parquet")] == ["part-00000.parquet"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a batch predict output"):
        predict_manifest(classifier_bundle, corrupt, tmp_path / "other", progress=False)


def test_manifest_frames_stream_each_format_with_row_numbers(tmp_path):
    from modalforge.data.manifest import ManifestError, write_manifest
    from modalforge.runtime.batch import ROW, manifest_frames
    from modalforge.schema import Column, Modality

    inputs = [Column("text", Modality.TEXT), Column("x", Modality.TABULAR, required=False)]
    frame = pd.DataFrame({"text": ["12", "NA", "b", "c", "d"], "x": [1.0, 2, 3, 4, 5],
                          "split": ["train", "test", "test", "train", "test"]})  # fmt: skip
    for suffix in (".csv", ".jsonl", ".parquet"):
        path = write_manifest(frame, tmp_path / f"m{suffix}")
        key, frames = manifest_frames(path, 2, inputs)
        chunks = list(frames)
        assert key is None and [len(c) for c in chunks] == [2, 2, 1]
        assert [r for c in chunks for r in c[ROW]] == [0, 1, 2, 3, 4]
        assert chunks[0]["text"].tolist() == ["12", "NA"]  # text stays text, "NA" is data
        _, test_rows = manifest_frames(path, 2, inputs, split="test")
        assert [r for c in test_rows for r in c[ROW]] == [1, 2, 4]
        with pytest.raises(ManifestError, match="id column 'key' not found"):
            manifest_frames(path, 2, inputs, id_column="key")
    with pytest.raises(ManifestError, match=r"no column \['image'\]"):
        manifest_frames(path, 2, [Column("image", Modality.IMAGE)])


def test_pool_leaves_a_cpu_free_and_blocks_feed_every_actor():
    from modalforge.runtime.batch import blocks_for
    from modalforge.runtime.batch_ray import plan_pool

    assert plan_pool(2.0) == plan_pool(2.0, None)
    two = plan_pool(2.0)
    assert (two.actors, two.cpus_per_actor, two.torch_threads) == (1, 1.0, 1)
    shared = plan_pool(2.0, actors=2)
    assert (shared.actors, shared.cpus_per_actor) == (2, 0.5)
    big = plan_pool(16.0, actors=5)
    assert (big.actors, big.cpus_per_actor, big.torch_threads) == (5, 3.0, 3)
    for cpus, actors in ((2.0, None), (2.0, 2), (3.0, 7), (16.0, None), (1.0, None)):
        pool = plan_pool(cpus, actors)
        # a whole CPU (half of one below 2) is never claimed: any 1-CPU task still fits
        assert cpus - pool.actors * pool.cpus_per_actor >= min(1.0, cpus / 2) - 1e-9
    with pytest.raises(ValueError, match="no free CPU"):
        plan_pool(0.0)
    with pytest.raises(ValueError, match="at least 1"):
        plan_pool(4.0, actors=0)
    # one Parquet file of 35 rows is one block: cut into >= 2 per actor, <= batch_size rows each
    assert blocks_for(35, 2, 64) == 4 and blocks_for(35, 1, 8) == 5 and blocks_for(3, 4, 64) == 3


def test_cli_predict_parquet_reports_the_failures_and_exits_0(classifier_bundle, corrupt,
                                                              tmp_path):  # fmt: skip
    from modalforge.cli import app

    run = CliRunner().invoke
    out = tmp_path / "scores.parquet"
    result = run(app, ["predict", str(classifier_bundle), "--manifest", str(corrupt), "--out",
                       str(out), "--batch-size", "16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "30 rows predicted, 5 failed" in flat(result.output)
    for ident, column in bad_ids(corrupt).items():
        assert f"id {ident}, column {column}:" in flat(result.output)
    assert len(pd.read_parquet(out)) == 35
    # command errors are not row errors: non-zero, with the reason
    missing = run(app, ["predict", str(classifier_bundle), "--manifest", str(corrupt), "--out",
                        str(tmp_path / "x.parquet"), "--id-column", "nope"])  # fmt: skip
    assert missing.exit_code == 1 and "id column 'nope' not found" in flat(missing.output)
    csv_ray = run(app, ["predict", str(classifier_bundle), "--manifest", str(corrupt), "--out",
                        str(tmp_path / "x.csv"), "--ray"])  # fmt: skip
    assert csv_ray.exit_code == 1 and "--out NAME.parquet" in flat(csv_ray.output)


def flat(output: str) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(output.split())


def within(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, failing the test if it has not returned in ``seconds`` (a hung
    Ray Data pipeline waits forever without an error)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as err:  # re-raised in the test's thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no result within {seconds:g} s: the pipeline hangs"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.slow
def test_ray_data_writes_the_same_rows_as_in_process_on_2_cpus(local_ray, classifier_bundle,
                                                               corrupt, tmp_path):  # fmt: skip
    from modalforge.runtime.batch import predict_manifest

    inproc = predict_manifest(classifier_bundle, corrupt, tmp_path / "a.parquet", batch_size=8,
                              progress=False)  # fmt: skip
    # two actors on the fixture's 2 CPUs: 0.5 CPU each, a CPU left over -- and no hang
    summary = within(120, predict_manifest, classifier_bundle, corrupt, tmp_path / "b.parquet",
                     ray=True, actors=2, batch_size=8, progress=False)  # fmt: skip
    assert (summary.mode, summary.actors, summary.cpus_per_actor) == ("ray", 2, 0.5)
    assert (summary.rows, summary.failed, summary.blocks) == (35, 5, 5)
    assert len(summary.rows_per_actor) == 2 and sum(summary.rows_per_actor) == 35  # both worked
    got = check_output(tmp_path / "b.parquet", corrupt, classifier_bundle)
    a = pd.read_parquet(tmp_path / "a.parquet").set_index("id").loc[got.index]
    assert (a["error"].fillna("") == got["error"].fillna("")).all()
    np.testing.assert_allclose(a["p:r"].to_numpy(float), got["p:r"].to_numpy(float), atol=1e-5)
    assert inproc.failures == summary.failures


@pytest.fixture(scope="module")
def contrastive(tmp_path_factory):
    """A tiny image:text / audio:text model (2 epochs: the test compares vectors, not quality)
    and its manifest with a truncated image and a missing one."""
    from .bundles import contrastive_manifest, contrastive_predictor

    root = tmp_path_factory.mktemp("clip")
    manifest = contrastive_manifest(root)
    p = contrastive_predictor(manifest, epochs=2)
    p.fit(manifest, out_dir=root / "run", progress=False)
    p.save(root / "clip")
    frame = pd.read_csv(manifest)
    (root / "img" / "cut.png").write_bytes((root / "img" / "0.png").read_bytes()[:30])
    frame.loc[3, "image"] = "img/cut.png"
    frame.loc[7, "image"] = "img/gone.png"
    frame.loc[9, "image"] = None  # no image: nothing to index, not a failure
    frame.to_csv(root / "index.csv", index=False)
    return p, root / "clip", root / "index.csv"


@pytest.mark.slow
def test_index_build_on_ray_indexes_the_good_rows_and_reports_the_bad(local_ray, contrastive,
                                                                      tmp_path):  # fmt: skip
    from modalforge.cli import app
    from modalforge.index import EmbeddingIndex

    p, bundle, manifest = contrastive
    out = tmp_path / "idx"
    result = within(180, CliRunner().invoke, app, ["index", "build", str(bundle), "--manifest",
                                                   str(manifest), "--out", str(out), "--ray",
                                                   "--actors", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    said = flat(result.output)
    assert "57 rows embedded, 2 failed" in said and "rows without 'image', left out: 1" in said
    assert "row 3 (line 5), column image:" in said
    assert "row 7 (line 9), column image: 'image': 'img/gone.png' not found" in said
    index = EmbeddingIndex.load(out)
    kept = [i for i in range(60) if i not in (3, 7, 9)]
    assert index.ids == [str(i) for i in kept]
    rows = pd.read_csv(manifest).iloc[kept]
    want, _ = p.embed(rows, "image", root=manifest.parent)
    np.testing.assert_allclose(index.vectors, want, atol=1e-5)
    for hit, colour in zip(index.search(want[:3], k=1), rows["colour"], strict=False):
        assert hit[0].metadata["colour"] == colour  # each entry keeps its row's columns
    shutil.rmtree(out)
