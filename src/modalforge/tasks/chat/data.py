"""Instruction conversations for the chat model: LLaVA's JSONL, read with every row checked, and
the built-in instruction sets made from the emoji and avdigits manifests.

The format is LLaVA's, one JSON object a line::

    {"id": "1F600:caption:0", "image": "images/1f600.png", "audio": "audio/1f600.flac",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "grinning face"}],
     "split": "train", "qtype": "caption"}

Rules, and why:

* Turns: an optional ``system`` turn first, then ``human`` and ``gpt`` alternating, starting with
  ``human`` and ending with ``gpt`` (the last answer is what a sample trains on). ``user`` and
  ``assistant`` are accepted for ``human`` and ``gpt``; files are written with LLaVA's names.
* Media: at most one image and one audio clip a sample (what our towers take), and an
  ``<image>`` / ``<audio>`` marker in a human turn says where its tokens go. A marker without
  its field is an error (there is nothing to put there). A field without a marker gets one at
  the start of the first human turn, as LLaVA does for images: files made by other tools load,
  and ``Conversation.turns`` always holds exactly one marker per medium, so the model code never
  guesses. Two markers of one kind, or a marker outside a human turn, are errors.
* Paths are relative to the JSONL's folder (absolute ones are kept as they are) and must resolve,
  symlinks followed, under ``root`` (by default that folder): ``modalforge.data.manifest``'s
  rule, through its ``resolve_path``. A file written next to, not inside, its dataset
  (``chat/x.jsonl`` pointing at ``../data/emoji/...``) is read with the common parent as root.
* Reading checks every row (JSON, fields, turn order, markers, paths, that files exist; decoding
  them is left to the loader) and raises one ``ConversationError`` listing every problem by line
  and field, like manifest validation: one run shows everything to fix.

The instruction sets keep their manifest's ``split`` (emoji's is grouped: no emoji on both sides)
and tag each conversation with a ``qtype`` so a recipe can size them (``max_per_type``) and an
evaluation can score them per type. The VQA questions are ``tasks.vqa.vqa_manifest``'s, verbatim,
so the chat model and the VQA classifier answer the same test questions.
"""

from __future__ import annotations

import collections
import json
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modalforge.data.manifest import (
    Manifest,
    ManifestError,
    PathOutsideRoot,
    is_missing,
    read_manifest,
    resolve_path,
)
from modalforge.files import atomic_write_bytes

Role = Literal["system", "user", "assistant"]
ROLES: dict[str, Role] = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant",
    "assistant": "assistant",
}  # fmt: skip
WIRE = {"system": "system", "user": "human", "assistant": "gpt"}  # the names files are written with
MEDIA = ("image", "audio")
MARKERS = {"image": "<image>", "audio": "<audio>"}
SPLITS = ("train", "val", "test")
FIELDS = frozenset(["id", *MEDIA, "conversations", "split", "qtype"])
MAX_REPORTED = 20  # problems listed in the error's message (all are kept on the error)

# The caption questions: train gets every phrasing (the answer must not hang on the wording);
# val and test ask the first only, so the chat model is scored once per emoji, like the captioner.
CAPTION_QUESTIONS = ("What is this?", "What emoji is this?", "Name this emoji.",
                     "What does this picture show?")  # fmt: skip
SPEECH_QUESTION = "What is said in this clip?"
MATCH_QUESTION = "Do these match? Answer yes or no."
EMOJI_QTYPES = ("caption", "vqa-category", "vqa-subcategory", "vqa-yes/no", "yesno", "speech",
                "match", "multiturn")  # fmt: skip
DIGIT_QUESTIONS = {
    "digit-image": "Which digit is shown?",
    "digit-audio": "Which digit is spoken?",
    "digit-both": "The picture and the clip are the same digit, each partly hidden by noise. "
    "Which digit is it?",
    "digit-match": "Is the digit shown the digit spoken? Answer yes or no.",
}
DIGIT_QTYPES = tuple(DIGIT_QUESTIONS)


@dataclass
class Turn:
    role: Role
    text: str


@dataclass
class Conversation:
    """One sample. ``image`` / ``audio`` are resolved paths once read (a relative one, when built
    in memory, is taken as relative to the JSONL's folder on writing); ``meta`` holds a row's
    other fields, written back as they were."""

    id: str
    image: Path | None
    audio: Path | None
    turns: list[Turn]
    split: str | None = None
    qtype: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> str:
        """The last assistant turn: what the sample is scored on."""
        return next(t.text for t in reversed(self.turns) if t.role == "assistant")

    @property
    def question_turns(self) -> list[Turn]:
        """The turns before the last answer: what the model is asked when it is scored."""
        last = max(i for i, t in enumerate(self.turns) if t.role == "assistant")
        return self.turns[:last]


@dataclass(frozen=True)
class RowProblem:
    line: int  # 1-based line of the JSONL
    field: str  # "conversations[1].from"; "" for the row as a whole
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: {self.field}: " if self.field else f"line {self.line}: "
        return where + self.message


class ConversationError(ValueError):
    """Bad rows in a conversations file; ``problems`` holds all of them, the message the first
    ``MAX_REPORTED``."""

    def __init__(self, path: Path, problems: list[RowProblem], n_rows: int) -> None:
        self.path, self.problems, self.n_rows = path, problems, n_rows
        bad = len({p.line for p in problems})
        lines = [f"  {p}" for p in problems[:MAX_REPORTED]]
        if len(problems) > MAX_REPORTED:
            lines.append(f"  ... and {len(problems) - MAX_REPORTED} more problems")
        super().__init__(f"{path}: {bad} bad rows of {n_rows}\n" + "\n".join(lines))


def read_conversations(path: str | Path, root: str | Path | None = None) -> list[Conversation]:
    """Every conversation of a JSONL file, or ``ConversationError`` naming every bad row.

    root: the folder media must resolve under (default: the JSONL's folder); relative paths are
    always relative to the JSONL's folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: conversations file not found")
    folder = Path(os.path.abspath(path.parent))
    reader = _RowReader(folder, Path(root) if root is not None else folder)
    out, problems, n_rows = [], [], 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            n_rows += 1
            found: list[RowProblem] = []
            conv = reader.row(raw, line_no, found)
            problems += found
            if conv is not None and not found:
                out.append(conv)
    if problems:
        raise ConversationError(path, problems, n_rows)
    return out


class _RowReader:
    """Checks rows one at a time, remembering ids (duplicates are errors) and which files exist."""

    def __init__(self, folder: Path, root: Path) -> None:
        self.folder, self.root = folder, root
        self.ids: dict[str, int] = {}
        self.exists: dict[Path, bool] = {}

    def row(self, raw: bytes, line: int, problems: list[RowProblem]) -> Conversation | None:
        def bad(where: str, message: str) -> None:
            problems.append(RowProblem(line, where, message))

        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            return bad("", f"not valid UTF-8 ({err.reason} at byte {err.start})")
        except json.JSONDecodeError as err:
            return bad("", f"not valid JSON ({err.msg} at column {err.colno})")
        if not isinstance(record, dict):
            return bad("", f"expected a JSON object, got {type(record).__name__}")
        conv_id = self._id(record.get("id"), line, bad)
        media = {m: self._media(record, m, bad) for m in MEDIA}
        turns = _turns(record.get("conversations"), bad)
        if turns is not None:
            _place_markers(turns, {m: m in record and record[m] is not None for m in MEDIA}, bad)
        split = record.get("split")
        if split is not None and split not in SPLITS:
            bad("split", f"expected one of {', '.join(SPLITS)}, got {split!r}")
        qtype = record.get("qtype")
        if qtype is not None and not isinstance(qtype, str):
            bad("qtype", f"expected a string, got {qtype!r}")
        if problems or conv_id is None or turns is None:
            return None
        meta = {k: v for k, v in record.items() if k not in FIELDS}
        return Conversation(conv_id, media["image"], media["audio"], turns, split, qtype, meta)

    def _id(self, value: Any, line: int, bad: Callable[[str, str], None]) -> str | None:
        if value is None:
            return bad("id", "missing")
        if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
            return bad("id", f"expected a non-empty string or an integer, got {value!r}")
        conv_id = str(value)
        if conv_id in self.ids:
            return bad("id", f"{conv_id!r} already used on line {self.ids[conv_id]}")
        self.ids[conv_id] = line
        return conv_id

    def _media(self, record: dict, name: str, bad: Callable[[str, str], None]) -> Path | None:
        value = record.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            return bad(name, f"expected a path relative to the file's folder, got {value!r}")
        text = value.strip()
        try:  # an absolute `text` stays as it is; a relative one is under the JSONL's folder
            path = resolve_path(self.root, text if "://" in text else str(self.folder / text))
        except PathOutsideRoot as err:
            return bad(name, f"{value!r} refused: {err}")
        if path not in self.exists:
            self.exists[path] = path.is_file()
        if not self.exists[path]:
            return bad(name, f"{value!r} not found (looked for {path})")
        return path


def _turns(value: Any, bad: Callable[[str, str], None]) -> list[Turn] | None:
    """The turns, checked for shape and order; None when any is unusable."""
    if not isinstance(value, list) or not value:
        return bad("conversations", f"expected a non-empty list of turns, got {_short(value)}")
    turns: list[Turn] = []
    prev: str | None = None  # the previous turn's "from", as written
    ok = True
    for k, turn in enumerate(value):
        where = f"conversations[{k}]"
        if not isinstance(turn, dict):
            bad(where, f"expected an object with 'from' and 'value', got {_short(turn)}")
            ok, prev = False, None
            continue
        raw = turn.get("from")
        text = turn.get("value")
        if not isinstance(text, str):
            bad(f"{where}.value", f"expected a string, got {_short(text)}")
            ok = False
        elif not text.strip():
            bad(f"{where}.value", "empty text")
            ok = False
        role = ROLES.get(raw) if isinstance(raw, str) else None
        if role is None:
            bad(f"{where}.from", f"expected human, gpt or system (or user, assistant), got {raw!r}")
            ok, prev = False, None
            continue
        if role == "system":
            if k:
                bad(f"{where}.from", f"a 'system' turn comes first only, got one after {prev!r}")
                ok = False
        else:
            last = ROLES.get(prev) if prev is not None else None
            expected = "assistant" if last == "user" else "user"
            if role != expected and (prev is not None or k == 0):
                after = f"after {prev!r}" if prev is not None else "first"
                bad(f"{where}.from", f"expected {WIRE[expected]!r} {after}, got {raw!r}")
                ok = False
        prev = raw
        turns.append(Turn(role, text if isinstance(text, str) else ""))
    if ok and not any(t.role == "user" for t in turns):
        bad("conversations", "no 'human' turn")
        ok = False
    elif ok and turns[-1].role != "assistant":
        bad("conversations", f"ends with a {WIRE[turns[-1].role]!r} turn; the last turn is the "
            "answer ('gpt')")  # fmt: skip
        ok = False
    return turns if ok else None


def _place_markers(turns: list[Turn], has: dict[str, bool], bad: Callable[[str, str], None]):
    """Check the <image>/<audio> markers against the fields; add the missing ones (module doc)."""
    for medium in reversed(MEDIA):  # audio first, so a sample with both reads "<image>\n<audio>"
        marker = MARKERS[medium]
        where = [k for k, t in enumerate(turns) for _ in range(t.text.count(marker))]
        for k in sorted(set(where)):
            if turns[k].role != "user":
                bad(f"conversations[{k}].value", f"a {marker} marker belongs in a 'human' turn")
        if len(where) > 1:
            bad("conversations", f"{len(where)} {marker} markers; a sample holds at most one "
                f"{medium}")  # fmt: skip
        elif where and not has[medium]:
            bad(f"conversations[{where[0]}].value", f"a {marker} marker but no {medium!r} field")
        elif not where and has[medium]:
            first = next(t for t in turns if t.role == "user")
            first.text = f"{marker}\n{first.text}"


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if value is not None else "nothing"
    return text if len(text) <= 60 else text[:57] + "..."


def write_conversations(path: str | Path, convs: Iterable[Conversation]) -> Path:
    """Write conversations as JSONL, atomically (a reader never sees half a file); media paths
    relative to the file's folder (``..`` where the media lie outside it)."""
    path = Path(path)
    folder = Path(os.path.abspath(path.parent))
    lines, ids = [], set()
    for conv in convs:
        if conv.id in ids:
            raise ValueError(f"conversation id {conv.id!r} appears twice")
        ids.add(conv.id)
        record: dict[str, Any] = {"id": conv.id}
        for medium in MEDIA:
            media = getattr(conv, medium)
            if media is not None:
                media = Path(media)
                rel = os.path.relpath(media, folder) if media.is_absolute() else media
                record[medium] = Path(rel).as_posix()
        record["conversations"] = [{"from": WIRE[t.role], "value": t.text} for t in conv.turns]
        for key, value in (("split", conv.split), ("qtype", conv.qtype)):
            if value is not None:
                record[key] = value
        clash = FIELDS & set(conv.meta)
        if clash:
            raise ValueError(f"conversation {conv.id!r}: meta keys {sorted(clash)} are fields")
        record.update(conv.meta)
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))
    return path


def counts(convs: Iterable[Conversation]) -> dict[str, dict[str, int]]:
    """split -> qtype -> conversations (``-`` for no split / no qtype)."""
    c = collections.Counter((conv.split or "-", conv.qtype or "-") for conv in convs)
    out: dict[str, dict[str, int]] = {}
    for (split, qtype), n in sorted(c.items()):
        out.setdefault(split, {})[qtype] = n
    return out


# -- the built-in instruction sets ---------------------------------------------------------------


def _qa(conv_id, image, audio, question, answer, split, qtype, meta) -> Conversation:
    """A one-question conversation; the markers go first, image before audio."""
    prefix = ("<image>\n" if image is not None else "") + ("<audio>\n" if audio is not None else "")
    turns = [Turn("user", prefix + question), Turn("assistant", answer)]
    return Conversation(conv_id, image, audio, turns, split, qtype, dict(meta))


class _Rows:
    """A manifest's rows with their media resolved, and per split a seeded draw of another row
    (a distractor never crosses the split, so no test emoji is seen in training)."""

    def __init__(self, manifest_csv: str | Path, need: tuple[str, ...], seed: int) -> None:
        self.manifest: Manifest = read_manifest(manifest_csv)
        frame = self.manifest.frame
        absent = [c for c in need if c not in frame]
        if absent:
            raise ValueError(f"{manifest_csv}: columns {absent} not in the manifest "
                             f"(columns: {list(frame)})")  # fmt: skip
        self.records = frame.to_dict("records")
        self.rng = random.Random(seed)
        self.pools: dict[Any, list[int]] = collections.defaultdict(list)
        for i in range(len(self.records)):
            self.pools[self.split(i)].append(i)

    def split(self, i: int) -> str | None:
        value = self.records[i].get("split")
        return None if is_missing(value) else str(value)

    def path(self, i: int, column: str) -> Path | None:
        value = self.records[i].get(column)
        if value is None or is_missing(value):
            return None
        try:
            return self.manifest.resolve(value)
        except PathOutsideRoot as err:
            where = self.manifest.describe_row(i)
            raise ValueError(f"{self.manifest.path}: {where}, column {column}: {err}") from err

    def other(self, i: int, differs: Callable[[int], bool]) -> int | None:
        """Another row of ``i``'s split for which ``differs``; None when there is none."""
        pool = self.pools[self.split(i)]
        for _ in range(20):  # a handful of draws; then the slow, sure way
            j = self.rng.choice(pool)
            if differs(j):
                return j
        rest = [j for j in pool if differs(j)]
        return self.rng.choice(rest) if rest else None


def emoji_instructions(
    manifest_csv: str | Path, *, seed: int = 0, max_per_type: dict[str, int] | None = None
) -> list[Conversation]:
    """Conversations about each emoji of a manifest (``id, image, text, audio, category,
    subcategory, split``; ``text`` is the name, the caption target, and ``audio`` says it).

    qtypes: ``caption`` (name it), ``vqa-category`` / ``vqa-subcategory`` / ``vqa-yes/no``
    (``vqa_manifest``'s questions and answers on the same frame and seed), ``yesno`` ("Is this
    the {name} emoji?", once with its own name and once with another's), ``speech`` (what the
    clip says), ``match`` (its image with its own clip, and with another's), ``multiturn``
    (name it, then its category). The yes/no types are balanced: one yes, one no per emoji."""
    from modalforge.tasks.vqa import QUESTIONS, vqa_manifest  # torch: only when building

    rows = _Rows(manifest_csv, ("id", "image", "text"), seed)
    rec = rows.records
    out: list[Conversation] = []
    for i, r in enumerate(rec):
        image = rows.path(i, "image")
        if image is None or is_missing(r["text"]):
            continue
        eid, name, split = str(r["id"]), str(r["text"]), rows.split(i)
        audio = rows.path(i, "audio") if "audio" in r else None

        def ask(qtype, question, answer, k=0, img=image, clip=None, extra=None, base=(eid, split)):
            conv_id, extra = f"{base[0]}:{qtype}:{k}", {"source_id": base[0], **(extra or {})}
            out.append(_qa(conv_id, img, clip, question, answer, base[1], qtype, extra))

        asks = CAPTION_QUESTIONS if split in (None, "train") else CAPTION_QUESTIONS[:1]
        for k, question in enumerate(asks):
            ask("caption", question, name, k)
        j = rows.other(i, lambda j, name=name: str(rec[j]["text"]) != name)
        if j is not None:
            ask("yesno", f"Is this the {name} emoji?", "yes", 0)
            ask("yesno", f"Is this the {rec[j]['text']} emoji?", "no", 1)
        if audio is not None:
            ask("speech", SPEECH_QUESTION, name, img=None, clip=audio)
            j = rows.other(
                i, lambda j, name=name: str(rec[j]["text"]) != name and rows.path(j, "audio")
            )
            if j is not None:
                ask("match", MATCH_QUESTION, "yes", 0, clip=audio, extra={"audio_id": eid})
                other = {"audio_id": str(rec[j]["id"])}
                ask("match", MATCH_QUESTION, "no", 1, clip=rows.path(j, "audio"), extra=other)
        if not is_missing(r.get("category")):
            turns = [Turn("user", f"<image>\n{CAPTION_QUESTIONS[0]}"), Turn("assistant", name)]
            turns += [Turn("user", QUESTIONS["category"]), Turn("assistant", str(r["category"]))]
            meta = {"source_id": eid}
            out.append(
                Conversation(f"{eid}:multiturn:0", image, None, turns, split, "multiturn", meta)
            )
    questions = vqa_manifest(rows.manifest.frame, seed=seed)
    index = {str(r["id"]): i for i, r in enumerate(rec)}
    seen: collections.Counter[str] = collections.Counter()
    for q in questions.to_dict("records"):
        i = index[str(q["id"])]
        eid, qtype = str(q["id"]), f"vqa-{q['qtype']}"
        k = seen[eid, qtype]
        seen[eid, qtype] += 1
        out.append(_qa(f"{eid}:{qtype}:{k}", rows.path(i, "image"), None, q["question"],
                       q["answer"], rows.split(i), qtype, {"source_id": eid}))  # fmt: skip
    return cap_per_type(out, max_per_type, seed, EMOJI_QTYPES)


def avdigits_instructions(
    manifest_csv: str | Path, *, seed: int = 0, max_per_type: dict[str, int] | None = None
) -> list[Conversation]:
    """Conversations about each avdigits row (``id, image, audio, label, split``): the digit
    shown (``digit-image``), spoken (``digit-audio``), both at once (``digit-both``: the fusion
    question, each alone is degraded), and whether a picture and a clip agree (``digit-match``:
    the row's own clip, and one of another digit from the same split; balanced)."""
    rows = _Rows(manifest_csv, ("id", "image", "audio", "label"), seed)
    rec = rows.records
    out: list[Conversation] = []
    for i, r in enumerate(rec):
        if is_missing(r["label"]):
            continue
        did, digit, split = str(r["id"]), str(r["label"]), rows.split(i)
        image, audio = rows.path(i, "image"), rows.path(i, "audio")
        meta = {"source_id": did}
        asks = [("digit-image", image, None), ("digit-audio", None, audio)]
        asks += [("digit-both", image, audio)] if image and audio else []
        for qtype, img, clip in asks:
            if img or clip:
                out.append(_qa(f"{did}:{qtype}:0", img, clip, DIGIT_QUESTIONS[qtype], digit,
                               split, qtype, meta))  # fmt: skip
        if image is None or audio is None:
            continue
        j = rows.other(
            i, lambda j, digit=digit: str(rec[j]["label"]) != digit and rows.path(j, "audio")
        )
        if j is not None:
            for k, (clip, answer) in enumerate(((audio, "yes"), (rows.path(j, "audio"), "no"))):
                out.append(_qa(f"{did}:digit-match:{k}", image, clip,
                               DIGIT_QUESTIONS["digit-match"], answer, split, "digit-match",
                               {**meta, "audio_id": str(rec[j if k else i]["id"])}))  # fmt: skip
    return cap_per_type(out, max_per_type, seed, DIGIT_QTYPES)


def cap_per_type(
    convs: list[Conversation],
    max_per_type: dict[str, int] | None,
    seed: int = 0,
    qtypes: Iterable[str] | None = None,
) -> list[Conversation]:
    """At most ``max_per_type[qtype]`` conversations per split and qtype (``"*"``: every qtype
    not named), drawn with a seeded generator, in their original order. Where the answers are
    yes and no the draw alternates them, so a capped yes/no type stays balanced."""
    if not max_per_type:
        return convs
    known = set(qtypes) if qtypes is not None else {c.qtype for c in convs}
    for key, value in max_per_type.items():
        if key != "*" and key not in known:
            raise ValueError(f"max_per_type: unknown qtype {key!r} (qtypes: {sorted(known)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"max_per_type[{key!r}]: expected a count >= 0, got {value!r}")
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for n, conv in enumerate(convs):
        groups[conv.split, conv.qtype].append(n)
    keep: set[int] = set()
    for (split, qtype), members in groups.items():
        limit = max_per_type.get(qtype or "", max_per_type.get("*"))
        if limit is None or len(members) <= limit:
            keep.update(members)
            continue
        order = list(members)
        random.Random(f"{seed}:{split}:{qtype}").shuffle(order)
        by_answer: dict[str, list[int]] = collections.defaultdict(list)
        for n in order:
            by_answer[convs[n].answer].append(n)
        if set(by_answer) == {"yes", "no"}:
            yes, no = by_answer["yes"], by_answer["no"]
            order = [n for pair in zip(yes, no, strict=False) for n in pair]
            order += yes[len(no) :] + no[len(yes) :]
        keep.update(order[:limit])
    return [conv for n, conv in enumerate(convs) if n in keep]


BUILDERS: dict[str, Callable[..., list[Conversation]]] = {
    "emoji": emoji_instructions,
    "avdigits": avdigits_instructions,
}


def build_instructions(
    dataset_dir_or_manifest: str | Path,
    out_jsonl: str | Path,
    *,
    kind: str | None = None,
    seed: int = 0,
    max_per_type: dict[str, int] | None = None,
) -> dict[str, dict[str, int]]:
    """Write a built-in dataset's instruction conversations to ``out_jsonl``; split -> qtype ->
    count. A dataset folder is read through its ``manifest-retrieval.csv`` when it has one (the
    grouped split the captioner and VQA configs use), else ``manifest.csv``. ``kind`` (a key of
    ``BUILDERS``) defaults to the ``name`` in the folder's ``dataset.json``, else to what the
    columns say (``label`` without ``text``: avdigits)."""
    source = Path(dataset_dir_or_manifest)
    if source.is_dir():
        retrieval = source / "manifest-retrieval.csv"
        source = retrieval if retrieval.is_file() else source / "manifest.csv"
    if kind is None:
        kind = _guess_kind(source)
    if kind not in BUILDERS:
        raise ValueError(f"no instruction builder for {kind!r} (builders: {sorted(BUILDERS)})")
    convs = BUILDERS[kind](source, seed=seed, max_per_type=max_per_type)
    write_conversations(out_jsonl, convs)
    return counts(convs)


def _guess_kind(manifest: Path) -> str:
    meta = manifest.parent / "dataset.json"
    if meta.is_file():
        try:
            name = json.loads(meta.read_text(encoding="utf-8")).get("name")
        except (OSError, json.JSONDecodeError, AttributeError):
            name = None
        if name in BUILDERS:
            return name
    columns = set(read_manifest(manifest).columns)
    if "label" in columns and "text" not in columns:
        return "avdigits"
    if "text" in columns:
        return "emoji"
    raise ValueError(f"{manifest}: cannot tell which instruction builder fits; pass kind= "
                     f"({sorted(BUILDERS)})")  # fmt: skip


__all__ = [
    "BUILDERS",
    "Conversation",
    "ConversationError",
    "RowProblem",
    "Turn",
    "avdigits_instructions",
    "build_instructions",
    "cap_per_type",
    "counts",
    "emoji_instructions",
    "read_conversations",
    "write_conversations",
]
