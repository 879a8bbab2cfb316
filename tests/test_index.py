"""EmbeddingIndex: exact search against brute force, HNSW recall, float16, save/load, errors."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

import modalforge.index as index_mod
from modalforge.index import EmbeddingIndex, Hit


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    # HNSW builds are small here; one thread keeps the tests from competing for the CPU
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _data(n: int, d: int, seed: int = 0, q: int = 20):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    queries = rng.standard_normal((q, d)).astype(np.float32)
    ids = [f"row{i}" for i in range(n)]
    return ids, vectors, queries


def _brute_force(vectors, queries, k, cosine):
    if cosine:
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    s = queries.astype(np.float64) @ vectors.astype(np.float64).T
    rows = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(s, rows, 1)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


# -- exact search ----------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_exact_matches_brute_force(metric):
    ids, vectors, queries = _data(300, 16)
    index = EmbeddingIndex(ids, vectors * 3.0, metric=metric, kind="exact")
    hits = index.search(queries * 0.5, k=7)
    rows, scores = _brute_force(vectors * 3.0, queries * 0.5, 7, cosine=metric == "cosine")
    assert len(hits) == len(queries)
    for h, r, s in zip(hits, rows, scores, strict=True):
        assert [x.id for x in h] == [ids[j] for j in r]
        np.testing.assert_allclose([x.score for x in h], s, rtol=1e-5, atol=1e-5)
    if metric == "cosine":
        assert all(-1.0 - 1e-6 <= x.score <= 1.0 + 1e-6 for h in hits for x in h)
    else:  # raw inner products of the scaled vectors: well above 1
        assert max(x.score for h in hits for x in h) > 2.0


def test_exact_chunking_changes_nothing(monkeypatch):
    ids, vectors, queries = _data(200, 8, q=30)
    index = EmbeddingIndex(ids, vectors, kind="exact")
    whole = index.search_arrays(queries, k=5)
    # tiny chunks: 5 rows × 12 queries at a time, so both loops and the merge run many times
    monkeypatch.setattr(index_mod, "_EXACT_CHUNK_ELEMENTS", 64)
    chunked = index.search_arrays(queries, k=5)
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-6)


def test_single_query_small_index_and_metadata():
    ids, vectors, _ = _data(3, 4)
    meta = [{"text": "a cat"}, {"text": "a dog", "category": "pet"}, {"path": "img/2.png"}]
    index = EmbeddingIndex(ids, vectors, meta)
    hits = index.search(vectors[1], k=10)  # a (D,) query, k > N
    assert len(hits) == 1 and len(hits[0]) == 3
    top = hits[0][0]
    assert isinstance(top, Hit)
    assert top.id == "row1" and top.score == pytest.approx(1.0, abs=1e-6)
    assert top.metadata == {"text": "a dog", "category": "pet"}
    id_, score, metadata = top  # unpacks as (id, score, metadata)
    assert (id_, score, metadata["text"]) == ("row1", top.score, "a dog")
    # a returned dict is a copy: editing it does not edit the index
    top.metadata["text"] = "changed"
    assert index.search(vectors[1], k=1)[0][0].metadata["text"] == "a dog"


# -- HNSW ------------------------------------------------------------------------------------


def test_hnsw_recall_against_exact():
    ids, vectors, queries = _data(5000, 64, seed=1, q=100)
    exact = EmbeddingIndex(ids, vectors, kind="exact")
    hnsw = EmbeddingIndex(ids, vectors, kind="hnsw")
    assert hnsw.backend == "hnsw" and exact.backend == "exact"
    truth, truth_scores = exact.search_arrays(queries, k=10)
    found, found_scores = hnsw.search_arrays(queries, k=10)
    assert _recall(found, truth) >= 0.9
    # the scores HNSW reports are the true inner products of the rows it returns
    same = found == truth
    np.testing.assert_allclose(found_scores[same], truth_scores[same], rtol=1e-5, atol=1e-6)


def test_auto_switches_to_hnsw_at_threshold_and_add_grows_it():
    ids, vectors, queries = _data(60, 8)
    index = EmbeddingIndex(ids[:40], vectors[:40], exact_threshold=50)
    assert index.backend == "exact"
    index.add(ids[40:], vectors[40:])
    assert index.backend == "hnsw" and len(index) == 60
    exact = EmbeddingIndex(ids, vectors, kind="exact")
    # 60 rows and a beam of 128: the graph search visits everything, so it is exact here
    np.testing.assert_array_equal(
        index.search_arrays(queries, 5)[0], exact.search_arrays(queries, 5)[0]
    )
    # adding to a built graph: every new row is found as its own nearest neighbour
    more_ids, more, _ = _data(30, 8, seed=5)
    more_ids = [f"new{i}" for i in range(30)]
    index.add(more_ids, more, [{"n": i} for i in range(30)])
    hits = index.search(more, k=1)
    assert [h[0].id for h in hits] == more_ids
    assert [h[0].metadata["n"] for h in hits] == list(range(30))


def test_hnsw_k_larger_than_count():
    ids, vectors, queries = _data(5, 8)
    index = EmbeddingIndex(ids, vectors, kind="hnsw")
    hits = index.search(queries[:2], k=10)
    assert [len(h) for h in hits] == [5, 5]
    assert sorted(x.id for x in hits[0]) == sorted(ids)


# -- float16 storage -------------------------------------------------------------------------


def test_float16_same_top1_and_half_the_bytes(tmp_path):
    ids, vectors, queries = _data(2000, 64, seed=2, q=200)
    f32 = EmbeddingIndex(ids, vectors, dtype="float32", kind="exact")
    f16 = EmbeddingIndex(ids, vectors, dtype="float16", kind="exact")
    assert f16.vectors.dtype == np.float16
    assert f16.vectors.nbytes * 2 == f32.vectors.nbytes
    top32 = f32.search_arrays(queries, k=1)[0][:, 0]
    top16 = f16.search_arrays(queries, k=1)[0][:, 0]
    assert np.mean(top32 == top16) >= 0.98
    a = (f32.save(tmp_path / "f32") / "vectors.npy").stat().st_size
    b = (f16.save(tmp_path / "f16") / "vectors.npy").stat().st_size
    assert b < 0.51 * a


# -- save / load -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "dtype"), [("exact", "float32"), ("hnsw", "float16")])
def test_save_load_round_trip(tmp_path, kind, dtype):
    ids, vectors, queries = _data(400, 16)
    meta = [{"text": f"caption {i}", "i": i} for i in range(400)]
    info = {"bundle": "runs/clip-tiny", "modality": "image"}
    index = EmbeddingIndex(ids, vectors, meta, kind=kind, dtype=dtype, ef_search=40, info=info)
    folder = index.save(tmp_path / "idx")
    names = sorted(p.name for p in folder.iterdir())
    assert names == (["hnsw.faiss"] if kind == "hnsw" else []) + ["index.json", "vectors.npy"]
    loaded = EmbeddingIndex.load(folder)
    assert loaded.backend == kind and loaded.dtype == dtype and loaded.info == info
    assert loaded.ids == ids and loaded.params == index.params
    assert loaded.search(queries, k=8) == index.search(queries, k=8)
    manifest = json.loads((folder / "index.json").read_text())
    assert manifest["count"] == 400 and manifest["dim"] == 16 and manifest["kind"] == kind


def test_save_refuses_to_clobber(tmp_path):
    ids, vectors, _ = _data(10, 4)
    index = EmbeddingIndex(ids, vectors)
    folder = index.save(tmp_path / "idx")
    with pytest.raises(FileExistsError, match="overwrite"):
        index.save(folder)
    index.add(["extra"], vectors[:1] + 1.0)
    index.save(folder, overwrite=True)
    assert len(EmbeddingIndex.load(folder)) == 11
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an embedding index"):
        index.save(other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"


def _saved(tmp_path, kind="exact", n=50):
    ids, vectors, _ = _data(n, 8)
    return EmbeddingIndex(ids, vectors, kind=kind).save(tmp_path / "idx")


def test_tampered_count_is_refused(tmp_path):
    folder = _saved(tmp_path)
    manifest = json.loads((folder / "index.json").read_text())
    manifest["count"] = 49
    (folder / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"index\.json.*count is 49"):
        EmbeddingIndex.load(folder)


def test_vectors_disagreeing_with_manifest_are_refused(tmp_path):
    folder = _saved(tmp_path)
    np.save(folder / "vectors.npy", np.zeros((49, 8), np.float32))
    with pytest.raises(ValueError, match=r"vectors\.npy.*49 rows|vectors\.npy: shape"):
        EmbeddingIndex.load(folder)
    np.save(folder / "vectors.npy", np.zeros((50, 8), np.float16))
    with pytest.raises(ValueError, match=r"vectors\.npy: dtype float16"):
        EmbeddingIndex.load(folder)


def test_pickled_vectors_are_refused(tmp_path):
    folder = _saved(tmp_path)
    np.save(folder / "vectors.npy", np.array([{"a": 1}] * 50, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"vectors\.npy: unreadable"):
        EmbeddingIndex.load(folder)


def test_hnsw_file_from_another_index_is_refused(tmp_path):
    folder = _saved(tmp_path, kind="hnsw")
    other = _saved(tmp_path / "b", kind="hnsw", n=60)
    (folder / "hnsw.faiss").write_bytes((other / "hnsw.faiss").read_bytes())
    with pytest.raises(ValueError, match=r"hnsw\.faiss: 60 vectors"):
        EmbeddingIndex.load(folder)
    # same count, different vectors: caught by the spot check
    ids, vectors, _ = _data(50, 8, seed=9)
    faiss.write_index(EmbeddingIndex(ids, vectors, kind="hnsw")._hnsw, str(folder / "hnsw.faiss"))
    with pytest.raises(ValueError, match=r"hnsw\.faiss: its vectors differ"):
        EmbeddingIndex.load(folder)
    (folder / "hnsw.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(ValueError, match=r"hnsw\.faiss: unreadable"):
        EmbeddingIndex.load(folder)
    (folder / "hnsw.faiss").unlink()
    with pytest.raises(ValueError, match=r"hnsw\.faiss: missing"):
        EmbeddingIndex.load(folder)


# -- errors ----------------------------------------------------------------------------------


def test_query_dimension_mismatch():
    ids, vectors, _ = _data(10, 512)
    index = EmbeddingIndex(ids, vectors)
    with pytest.raises(ValueError, match="query has 384 dims, index has 512"):
        index.search(np.ones((2, 384), np.float32))
    with pytest.raises(ValueError, match="query has 384 dims, index has 512"):
        index.search(np.ones(384, np.float32))
    with pytest.raises(ValueError, match="vectors have 384 dims, index has 512"):
        index.add(["x"], np.ones((1, 384), np.float32))


def test_duplicate_ids_are_refused():
    ids, vectors, _ = _data(4, 8)
    with pytest.raises(ValueError, match=r"duplicate ids \(1\): 'row1'"):
        EmbeddingIndex(["row0", "row1", "row1", "row3"], vectors)
    index = EmbeddingIndex(ids, vectors, kind="hnsw")
    with pytest.raises(ValueError, match=r"duplicate ids \(1\): 'row2'"):
        index.add(["new", "row2"], vectors[:2])
    # the refused add changed nothing, in the rows or in the graph
    assert len(index) == 4 and index.ids == ids and index._hnsw.ntotal == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metadata": [{"a": 1}]}, "1 metadata entries for 4 rows"),
        ({"metadata": [{"a": object()}] * 4}, "JSON-safe"),
        ({"metric": "l2"}, "metric must be one of"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"kind": "ivf"}, "kind must be one of"),
        ({"hnsw_m": 0}, "hnsw_m must be a positive integer"),
        ({"info": {"x": float("nan")}}, "info must be JSON-safe"),
    ],
)
def test_bad_arguments(kwargs, match):
    ids, vectors, _ = _data(4, 8)
    with pytest.raises(ValueError, match=match):
        EmbeddingIndex(ids, vectors, **kwargs)


def test_zero_and_nonfinite_vectors():
    ids, vectors, _ = _data(3, 4)
    vectors[1] = 0.0
    with pytest.raises(ValueError, match="row 1 is all zeros"):
        EmbeddingIndex(ids, vectors)
    EmbeddingIndex(ids, vectors, metric="ip")  # a zero row is fine for a raw inner product
    vectors[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        EmbeddingIndex(ids, vectors, metric="ip")
