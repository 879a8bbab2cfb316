"""Chat instruction data: LLaVA JSONL read with every bad row reported, and the emoji / avdigits
instruction sets (VQA questions identical to ``vqa_manifest``'s, splits kept, yes/no balanced)."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from modalforge.data.manifest import read_manifest
from modalforge.tasks.chat.data import (
    DIGIT_QTYPES,
    EMOJI_QTYPES,
    Conversation,
    ConversationError,
    Turn,
    avdigits_instructions,
    build_instructions,
    cap_per_type,
    emoji_instructions,
    read_conversations,
    write_conversations,
)
from modalforge.tasks.vqa import vqa_manifest

from .conftest import png_bytes, sine, wav_bytes

# 10 names ending in "face" and 10 in "heart", each over two subcategories, so that vqa's
# yes/no words at its default min_count of 8 are "face" and "heart"
FACES = ["grinning", "smiling", "winking", "crying", "sleeping", "angry", "happy", "sad", "cat",
         "dog"]  # fmt: skip
OTHERS = [f"{c} heart" for c in ("red", "blue", "green", "yellow", "white", "black", "brown",
                                 "orange", "pink", "purple")]  # fmt: skip


def emoji_manifest(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "audio").mkdir()
    rows = []
    names = [f"{w} face" for w in FACES] + OTHERS
    for i, name in enumerate(names):
        eid = f"E{i:02d}"
        (root / "images" / f"{eid}.png").write_bytes(png_bytes((8, 8), (10 * i, 0, 0)))
        (root / "audio" / f"{eid}.wav").write_bytes(wav_bytes(sine(200 + 20 * i, 0.05)))
        face = i < len(FACES)
        rows.append({
            "id": eid, "image": f"images/{eid}.png", "text": name, "audio": f"audio/{eid}.wav",
            "category": "Smileys" if face else "Objects",
            "subcategory": ("face" if face else "heart") + "-ab"[i % 2],
            "group": eid, "split": ["train", "train", "val", "test"][i % 4],
        })  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def emoji(tmp_path_factory):
    csv = emoji_manifest(tmp_path_factory.mktemp("emoji"))
    return csv, emoji_instructions(csv, seed=0)


def test_every_qtype_is_made_and_the_vqa_questions_are_vqa_manifests(emoji):
    csv, convs = emoji
    assert {c.qtype for c in convs} == set(EMOJI_QTYPES)
    expected = vqa_manifest(read_manifest(csv).frame, seed=0)
    assert set(expected["qtype"]) == {"category", "subcategory", "yes/no"}
    got = [(c.meta["source_id"], c.turns[0].text.removeprefix("<image>\n"), c.answer,
            c.qtype.removeprefix("vqa-"), c.split, c.image.name)
           for c in convs if c.qtype.startswith("vqa-")]  # fmt: skip
    want = [(r["id"], r["question"], r["answer"], r["qtype"], r["split"], Path(r["image"]).name)
            for r in expected.to_dict("records")]  # fmt: skip
    assert got == want
    assert all(c.turns[0].text.startswith("<image>\n") for c in convs if c.qtype != "speech")


def test_answers_come_from_the_manifest(emoji):
    csv, convs = emoji
    frame = pd.read_csv(csv).set_index("id")
    for c in convs:
        row = frame.loc[c.meta["source_id"]]
        if c.qtype in ("caption", "speech"):
            assert c.answer == row["text"]
        if c.qtype == "speech":
            assert c.image is None and c.audio.name == Path(row["audio"]).name
            assert c.turns[0].text == "<audio>\nWhat is said in this clip?"
        if c.qtype == "multiturn":
            assert [t.role for t in c.turns] == ["user", "assistant"] * 2
            assert (c.turns[1].text, c.turns[3].text) == (row["text"], row["category"])
        if c.qtype == "yesno":
            said = c.turns[0].text.removeprefix("<image>\nIs this the ").removesuffix(" emoji?")
            assert (said == row["text"]) == (c.answer == "yes"), c
        if c.qtype == "match":
            assert (c.meta["audio_id"] == c.meta["source_id"]) == (c.answer == "yes"), c
    train_captions = [c for c in convs if c.qtype == "caption" and c.split == "train"]
    test_captions = [c for c in convs if c.qtype == "caption" and c.split == "test"]
    assert len({c.turns[0].text for c in train_captions}) > 1  # several phrasings in training
    assert len(test_captions) == (frame["split"] == "test").sum()  # one per test emoji


def test_splits_are_kept_and_no_emoji_crosses_them(emoji):
    csv, convs = emoji
    split_of = pd.read_csv(csv).set_index("id")["split"].to_dict()
    seen = collections.defaultdict(set)
    for c in convs:
        assert c.split == split_of[c.meta["source_id"]]
        seen[c.meta["source_id"]].add(c.split)
        if "audio_id" in c.meta:  # a mismatched clip comes from the same split
            assert split_of[c.meta["audio_id"]] == c.split
        if c.qtype == "yesno" and c.answer == "no":  # so does a wrong name
            name = c.turns[0].text.removeprefix("<image>\nIs this the ").removesuffix(" emoji?")
            other = pd.read_csv(csv).set_index("text").loc[name, "split"]
            assert other == c.split
    assert all(len(s) == 1 for s in seen.values())
    assert len({c.id for c in convs}) == len(convs)


def test_yes_no_types_are_balanced_per_split(emoji):
    _, convs = emoji
    for qtype in ("yesno", "match", "vqa-yes/no"):
        for split in ("train", "val", "test"):
            answers = collections.Counter(c.answer for c in convs
                                          if c.qtype == qtype and c.split == split)  # fmt: skip
            assert answers["yes"] == answers["no"] > 0, (qtype, split, answers)


def test_a_cap_per_split_and_type_keeps_yes_no_balanced(emoji):
    _, convs = emoji
    capped = cap_per_type(convs, {"yesno": 3, "caption": 2}, seed=0, qtypes=EMOJI_QTYPES)
    by = collections.Counter((c.split, c.qtype) for c in capped)
    assert by["train", "caption"] == 2 and by["train", "yesno"] == 3
    answers = collections.Counter(c.answer for c in capped if c.qtype == "yesno")
    assert abs(answers["yes"] - answers["no"]) <= 3  # one per split at most
    train_yes = [c.answer for c in capped if c.qtype == "yesno" and c.split == "train"]
    assert sorted(train_yes) in (["no", "no", "yes"], ["no", "yes", "yes"])
    assert by["train", "speech"] == sum(c.qtype == "speech" and c.split == "train" for c in convs)
    assert capped == cap_per_type(convs, {"yesno": 3, "caption": 2}, seed=0)  # seeded
    with pytest.raises(ValueError, match="unknown qtype 'yes-no'"):
        cap_per_type(convs, {"yes-no": 3}, qtypes=EMOJI_QTYPES)
    with pytest.raises(ValueError, match="expected a count"):
        cap_per_type(convs, {"*": -1})


def test_write_then_read_round_trips(emoji, tmp_path):
    _, convs = emoji
    out = write_conversations(tmp_path / "chat.jsonl", convs)
    assert not list(tmp_path.glob(".*tmp*"))  # written aside, then renamed
    # media live outside the file's folder: a root above both reads them, the default refuses
    back = read_conversations(out, root=Path(os.path.commonpath([out, convs[0].image])))
    assert back == convs
    first = json.loads(out.read_text().splitlines()[0])
    assert first["conversations"][0]["from"] == "human" and not Path(first["image"]).is_absolute()
    with pytest.raises(ConversationError, match="refused"):
        read_conversations(out)


def row(id_, turns, **fields):
    return {"id": id_, **fields, "conversations": [{"from": f, "value": v} for f, v in turns]}


QA = [("human", "What is this?"), ("gpt", "a cat")]


def test_every_bad_row_is_reported_at_once_with_its_line_and_field(tmp_path):
    (tmp_path / "img.png").write_bytes(png_bytes())
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    outside.write_bytes(png_bytes())
    (tmp_path / "link.png").symlink_to(outside)
    lines = [
        json.dumps(row("ok", [("human", "<image>\nWhat?"), ("gpt", "cat")], image="img.png")),
        '{"id": "broken", "conversations": [',
        json.dumps(row("two-humans", [("human", "a"), ("human", "b")])),
        json.dumps(row("gone", QA, image="missing.png")),
        json.dumps(row("escape", QA, image="../../etc/passwd")),
        json.dumps(row("marker", [("human", "<audio>\nWhat is said?"), ("gpt", "hi")])),
        json.dumps(row("ok", QA)),
        json.dumps(row("who", [("robot", "hi"), ("gpt", "hello")])),
        json.dumps(row("unanswered", [*QA, ("human", "and?")])),
        json.dumps(row("split", QA, split="holdout")),
        json.dumps(row("twice", [("human", "<image> <image>"), ("gpt", "x")], image="img.png")),
        json.dumps(row("symlink", QA, image="link.png")),
        json.dumps(row("absolute", QA, image=str(outside))),
        "",  # blank lines are skipped, not errors
        "[1, 2]",
        json.dumps({"conversations": [{"from": "human", "value": ""}, {"from": "gpt"}]}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConversationError) as info:
        read_conversations(path)
    err = info.value
    text = str(err)
    assert "bad.jsonl: 14 bad rows of 15" in text
    assert "line 2: not valid JSON" in text
    assert "line 3: conversations[1].from: expected 'gpt' after 'human', got 'human'" in text
    assert "line 4: image: 'missing.png' not found" in text
    assert "line 5: image: '../../etc/passwd' refused" in text
    assert "line 6: conversations[0].value: a <audio> marker but no 'audio' field" in text
    assert "line 7: id: 'ok' already used on line 1" in text
    assert "line 8: conversations[0].from: expected human, gpt or system" in text
    assert "line 9: conversations: ends with a 'human' turn" in text
    assert "line 10: split: expected one of train, val, test, got 'holdout'" in text
    assert "line 11: conversations: 2 <image> markers" in text
    assert "line 12: image: 'link.png' refused" in text
    assert "line 13: image:" in text and "refused" in text.split("line 13: image:")[1]
    assert "line 15: expected a JSON object, got list" in text
    assert "line 16: id: missing" in text and "line 16: conversations[0].value: empty text" in text
    assert "line 16: conversations[1].value: expected a string, got nothing" in text
    assert {p.line for p in err.problems} == set(range(2, 14)) | {15, 16}


def test_the_error_lists_a_capped_number_of_problems_but_keeps_all(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps(row(f"r{i}", [("gpt", "x")])) + "\n" for i in range(30)))
    with pytest.raises(ConversationError) as info:
        read_conversations(path)
    assert len(info.value.problems) == 30
    assert "... and 10 more problems" in str(info.value) and "line 21:" not in str(info.value)


def test_aliases_system_turns_and_markers_added_for_fields_without_one(tmp_path):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.png").write_bytes(png_bytes())
    (tmp_path / "media" / "a.wav").write_bytes(wav_bytes(sine()))
    turns = [("system", "Be brief."), ("user", "Describe."), ("assistant", "red"),
             ("human", "Sure?"), ("gpt", "yes")]  # fmt: skip
    path = tmp_path / "ok.jsonl"
    extra = {"source": "hand-made", "qtype": "caption"}
    path.write_text(json.dumps(row(7, turns, image="media/a.png", audio="media/a.wav", **extra)))
    (conv,) = read_conversations(path)
    assert conv.id == "7" and conv.qtype == "caption" and conv.meta == {"source": "hand-made"}
    assert [t.role for t in conv.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.turns[1].text == "<image>\n<audio>\nDescribe." and conv.turns[3].text == "Sure?"
    assert conv.image == (tmp_path / "media" / "a.png").resolve()
    assert conv.answer == "yes"
    again = read_conversations(write_conversations(tmp_path / "again.jsonl", [conv]))
    assert again == [conv]
    line = json.loads((tmp_path / "again.jsonl").read_text())
    assert [t["from"] for t in line["conversations"]] == ["system", "human", "gpt", "human", "gpt"]
    assert line["image"] == "media/a.png" and line["source"] == "hand-made"


def test_writing_refuses_duplicate_ids_and_meta_that_shadows_a_field(tmp_path):
    conv = Conversation("a", None, None, [Turn("user", "q"), Turn("assistant", "a")])
    with pytest.raises(ValueError, match="'a' appears twice"):
        write_conversations(tmp_path / "x.jsonl", [conv, conv])
    conv.meta = {"split": "train"}
    with pytest.raises(ValueError, match="meta keys"):
        write_conversations(tmp_path / "x.jsonl", [conv])
    assert not (tmp_path / "x.jsonl").exists()


def avdigits_dir(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "audio").mkdir()
    rows = []
    for i in range(30):
        (root / "images" / f"{i}.png").write_bytes(png_bytes((8, 8), (i, i, i), mode="RGB"))
        (root / "audio" / f"{i}.flac").write_bytes(wav_bytes(sine(300 + i, 0.05), fmt="FLAC"))
        rows.append({"id": str(i), "image": f"images/{i}.png", "audio": f"audio/{i}.flac",
                     "label": str(i % 10), "split": ["train", "val", "test"][i // 10],
                     "source": "espeak"})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "dataset.json").write_text(json.dumps({"name": "avdigits"}))
    return root


def test_avdigits_instructions(tmp_path):
    root = avdigits_dir(tmp_path / "avd")
    convs = avdigits_instructions(root / "manifest.csv")
    assert {c.qtype for c in convs} == set(DIGIT_QTYPES)
    label = {str(i): str(i % 10) for i in range(30)}
    split = {str(i): ["train", "val", "test"][i // 10] for i in range(30)}
    for c in convs:
        assert c.split == split[c.meta["source_id"]]
        if c.qtype == "digit-match":
            agree = label[c.meta["audio_id"]] == label[c.meta["source_id"]]
            assert agree == (c.answer == "yes") and split[c.meta["audio_id"]] == c.split
        else:
            assert c.answer == label[c.meta["source_id"]]
        media = {"digit-image": (True, False), "digit-audio": (False, True)}.get(c.qtype)
        assert (c.image is not None, c.audio is not None) == (media or (True, True))
    answers = collections.Counter(c.answer for c in convs if c.qtype == "digit-match")
    assert answers["yes"] == answers["no"] == 30


def test_build_instructions_writes_a_readable_file_and_counts(tmp_path):
    root = avdigits_dir(tmp_path / "data" / "avd")
    out = tmp_path / "chat" / "avd.jsonl"
    got = build_instructions(root, out, max_per_type={"digit-match": 4})
    assert got["train"] == {"digit-audio": 10, "digit-both": 10, "digit-image": 10,
                            "digit-match": 4}  # fmt: skip
    assert set(got) == {"train", "val", "test"}
    back = read_conversations(out, root=tmp_path)
    assert len(back) == sum(sum(v.values()) for v in got.values())
    assert json.loads(out.read_text().splitlines()[0])["image"].startswith("../data/avd/images/")
    with pytest.raises(ValueError, match="no instruction builder for 'speech'"):
        build_instructions(root, out, kind="speech")


def test_build_instructions_prefers_the_grouped_retrieval_manifest(tmp_path):
    csv = emoji_manifest(tmp_path / "emoji")
    frame = pd.read_csv(csv)
    frame["split"] = "test"  # a different split in manifest-retrieval.csv: it is the one used
    frame.to_csv(tmp_path / "emoji" / "manifest-retrieval.csv", index=False)
    got = build_instructions(tmp_path / "emoji", tmp_path / "emoji" / "chat.jsonl")
    assert set(got) == {"test"} and got["test"]["caption"] == len(frame)
    assert set(got["test"]) == set(EMOJI_QTYPES)
