"""VQA: question-answer pairs from metadata, accuracy per question type, and chat completions
answered by a classifier of (image, question)."""

import base64

import numpy as np
import pandas as pd
import pytest

from modalforge.predictor import accuracy_by
from modalforge.vqa import vqa_manifest, yes_no_question, yes_no_words

from .bundles import vqa_manifest as vqa_manifest_of
from .bundles import vqa_predictor
from .conftest import COLORS, png_bytes


def test_questions_come_from_the_metadata_only_where_it_answers_them():
    frame = pd.DataFrame({
        "image": [f"{i}.png" for i in range(6)] + [None],
        "text": ["grinning face", "cat face", "red heart", "blue heart", "clapping hands",
                 "face with tears", "ghost face"],
        "category": ["smileys", "animals", "smileys", "smileys", "people", "smileys", "x"],
        "subcategory": ["face", "cat", "heart", "love", "hand", "face", "x"],
        "group": list("aabcdef"), "split": ["train"] * 5 + ["test"] * 2,
    })  # fmt: skip
    # a word qualifies when it ends enough names in at least two subcategories
    names, subcats = ["red heart", "blue heart", "cat face", "dog face"], ["h", "h", "c", "d"]
    assert yes_no_words(names, subcats, min_count=2) == ["face"]
    assert yes_no_words(names, None, min_count=2) == ["face", "heart"]
    q = vqa_manifest(frame, min_count=2)
    assert set(q["qtype"]) == {"category", "subcategory", "yes/no"}
    assert q["image"].notna().all() and "6.png" not in set(q["image"])  # no image, no question
    first = q[q["image"] == "0.png"]
    assert set(first["split"]) == {"train"} and set(first["group"]) == {"a"}
    assert list(first["answer"]) == ["smileys", "face", "yes", "no"]
    assert list(first["question"])[2:] == ["is this a face?", "is this a heart?"]
    assert "4.png" not in set(q.loc[q["qtype"] == "yes/no", "image"])  # "hands": not a word
    yes_no = q[q["qtype"] == "yes/no"]
    assert (yes_no["answer"] == "yes").sum() == (yes_no["answer"] == "no").sum() > 0
    for _, row in yes_no.iterrows():
        name = frame.loc[frame["image"] == row["image"], "text"].iloc[0]
        word = row["question"].split()[-1].rstrip("?")
        assert (word in name.split()) == (row["answer"] == "yes"), (row["question"], name)
    assert yes_no_question("face") == "is this a face?"
    assert yes_no_question("arrow") == "is this an arrow?"
    assert yes_no_question("eyes") == "are these eyes?"


def test_accuracy_by_group_and_its_majority_answer():
    frame = pd.DataFrame({"qtype": ["a", "a", "a", "b", "b"]})
    y = np.array([0, 0, 1, 2, 2])
    pred = np.array([0, 1, 1, 2, 0])
    got = accuracy_by(frame, "qtype", y, pred, ["no", "yes", "red"])
    assert got["a"] == {"rows": 3, "accuracy": pytest.approx(2 / 3), "majority": "no",
                        "majority_accuracy": pytest.approx(2 / 3)}  # fmt: skip
    assert got["b"]["accuracy"] == 0.5 and got["b"]["majority"] == "red"
    with pytest.raises(ValueError, match="no such column"):
        accuracy_by(frame, "kind", y, pred, ["no", "yes", "red"])


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    """Coloured squares asked "what colour is this?" and "is this red?" etc."""
    root = tmp_path_factory.mktemp("vqa")
    p = vqa_predictor(vqa_manifest_of(root))
    p.fit(root / "vqa.csv", out_dir=root / "run", progress=False)
    return p, root


def test_vqa_is_scored_per_question_type_and_answers_chat(vqa, tmp_path):
    from fastapi.testclient import TestClient

    from modalforge.serve import Engine, ServeConfig, create_app

    p, root = vqa
    result = p.evaluate(root / "vqa.csv", by="qtype", out_dir=tmp_path / "report")
    groups = result["by"]["groups"]
    assert set(groups) == {"colour", "yes/no"}
    assert groups["colour"]["majority_accuracy"] == pytest.approx(1 / 3)
    assert groups["colour"]["accuracy"] > 0.9, groups
    assert result["headline"]["accuracy qtype=colour"] == groups["colour"]["accuracy"]
    assert "Accuracy by qtype" in (tmp_path / "report" / "report.md").read_text()
    path = p.save(tmp_path / "bundle").path
    engine = Engine.from_bundle(path, device="cpu")
    url = "data:image/png;base64," + base64.b64encode(png_bytes((30, 30), COLORS["g"])).decode()
    message = [{"role": "user", "content": [{"type": "text", "text": "what colour is this?"},
                                            {"type": "image_url", "image_url": {"url": url}}]}]  # fmt: skip
    with TestClient(create_app(engine, ServeConfig())) as c:
        r = c.post("/v1/chat/completions", json={"messages": message})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "green"
        no_text = [{"role": "user", "content": [message[0]["content"][1]]}]
        r = c.post("/v1/chat/completions", json={"messages": no_text})
        assert r.status_code == 422 and "question" in r.json()["error"]["message"]


def test_two_hostile_questions_among_fourteen_good_ones_change_no_answer(vqa, tmp_path):
    from fastapi.testclient import TestClient

    from modalforge.serve import Engine, ServeConfig, create_app

    from .serving import hostile_mix

    p, _ = vqa
    engine = Engine.from_bundle(p.save(tmp_path / "bundle").path, device="cpu")

    def ask(image: str, question: str) -> dict:
        content = [{"type": "text", "text": question},
                   {"type": "image_url", "image_url": {"url": image}}]  # fmt: skip
        return {"url": "/v1/chat/completions",
                "json": {"messages": [{"role": "user", "content": content}]}}  # fmt: skip

    names = {"r": "red", "g": "green", "b": "blue"}
    good = [ask(_url(png_bytes((30, 30), COLORS[c])),
                "what colour is this?" if i % 2 else f"is this {names['rgb'[i // 3 % 3]]}?")
            for i, c in enumerate("rgb" * 5)][:14]  # fmt: skip
    hostile = [ask(_url(b"<html>not an image</html>", "text/html"), "what colour is this?"),
               ask(_url(png_bytes((30, 30), COLORS["r"])[:60]), "is this red?")]  # fmt: skip
    answer = lambda r: r.json()["choices"][0]["message"]["content"]  # noqa: E731
    with TestClient(create_app(engine, ServeConfig(max_batch=16, batch_timeout_ms=200))) as c:
        _, batches = hostile_mix(c, good, hostile, answer)
    assert any(failed and items > failed for items, failed in batches), batches


def _url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()
