"""Word error rate of the packaged Whisper tiny.en on real speech: the Asterisk prompts.

    .venv/bin/python benchmarks/asr_asterisk.py --out benchmarks/results/asr_asterisk.json

Audio: Debian's ``asterisk-core-sounds-en-wav`` (``/usr/share/asterisk/sounds/en_US_f_Allison``,
one speaker, 568 telephone-quality WAVs at 8 kHz), loaded with ``modalforge.data.audio
.load_audio`` (soxr resampling to 16 kHz, the clip's own length). Each file is transcribed once
by ``Transcriber.packaged()`` -- what ``modalforge transcribe`` and a served speech-to-text bundle
run: greedy, no timestamps, batches of 8 sorted by length; ``--window full`` (Whisper's stock
30-s window, the default) or ``trimmed`` (the clip's own frames + 2 s of silence: on these
one-word prompts the decoder then repeats the word until its token budget, "added added added
...", corpus WER 6.0 on the name set) -- torch on ``--threads`` threads (default 2).

References. The same Debian source package ships the prompts' transcript,
``/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz`` (``name: text`` lines); it is the
reference text throughout, with bracketed stage directions dropped (``[ascending tones]``,
``<beep ascending>``, ``(10 seconds of silence)``, ``at [@]`` -> ``at``) and the few misspellings
in ``TRANSCRIPT_FIXES`` corrected (``exclaimation``, ``fourtieth``, ``xray`` -> ``x-ray``, ...).

Two file sets:

* ``name`` (the headline): files whose **name is their words**. A file counts when the words of
  its name -- the stem split at ``-`` and ``_``; in ``digits/`` a numeric stem spelled out
  (``20`` -> ``twenty``); in ``phonetic/`` ``X_p`` read as the ICAO spelling word of X (``a_p``
  -> ``alpha``, ``9_p`` -> ``niner``) -- equal the words of its transcript line, compared
  lower-cased with spaces, hyphens, apostrophes and punctuation ignored (``oclock`` =
  ``o'clock``, ``hello-world`` = ``Hello world.``). The transcript check matters: many names are
  ordinary words but not what is said (``invalid`` says "I am sorry, that's not a valid
  extension. Please try again.", ``followme/status`` a whole sentence), so a dictionary rule
  alone would score Whisper against the wrong text. Application prefixes (``vm-``, ``conf-``,
  ``queue-``, ``spy-``, ...) are not stripped, so ``vm-goodbye`` does not count; those files are
  reported on their own as ``prefixed`` (prefix stripped, then the same check), not in the
  headline. Isolated letter names are excluded (see below), so are ``a-m`` / ``p-m``.
* ``transcript``: every file with speech, each against its transcript line, except the silence
  / tone files (nothing left after dropping stage directions), files over 30 s (Whisper's window;
  ``transcribe`` cuts there), and the letter names. Spelled-out codes and acronyms (``1234``,
  ``PBX``, ``H.323``, ``www.asterisk.org``) make this set's WER an upper bound.

Letters: ``letters/a.wav`` ... ``z.wav`` are letter *names* ("bee", "double-u"); a
transcript may legitimately be ``B``, ``b.`` or ``Bee``, so WER over them measures spelling
conventions. They are scored apart as accuracy: right when the hypothesis, normalized, is the
letter or one of its usual spellings (``LETTER_NAMES``).

Scoring: ``word_error_rate`` / ``normalize_words`` from the package (lower case, punctuation
dropped, digits 0-10 spelled out), reported ``raw``, and ``numbers``: both sides first pass
through ``spell_numbers`` here (every integer and decimal spelled out in US style without "and",
ordinals ``21st``, thousands separators, ``%``, ``*`` -> star, ``#`` -> pound, ``&`` -> and,
``@`` -> at), because ``normalize_words`` leaves ``11``-``99`` and beyond as digits while the
references say "eleven", "twenty". Corpus WER = word errors summed over files / reference words
summed; mean WER = the mean of the files' WERs. Writes JSON and a PNG (WER per folder) beside it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

from _machine import write_results
from modalforge.data.audio import SAMPLE_RATE, AudioConfig, load_audio
from modalforge.encoders.pretrained.whisper import (
    MAX_SECONDS,
    normalize_words,
    word_error_rate,
)
from modalforge.tasks.transcription import Transcriber

SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")

# misspellings in core-sounds-en.txt (the recording says the real word)
TRANSCRIPT_FIXES = {
    "phonetic/x_p": "x-ray",
    "letters/exclaimation-point": "exclamation point",
    "digits/h-40": "fortieth",
    "conf-adminmenu-menu8": (
        "Press 1 to list users currently in the conference, 2 to kick all non-administrator "
        "users, 3 to mute or unmute all non-administrator users, 4 to record this conference, "
        "or 8 to exit this menu and return to the conference."
    ),
    "queue-periodic-announce": (
        "All of our representatives are currently busy. Please stay on the line and your call "
        "will be answered by the next available representative."
    ),
    "unidentified-no-callback": "Unidentified or withheld and therefore cannot be called back.",
}
# application prefixes of top-level prompts (not part of what is said)
PREFIXES = ("agent", "astcc", "auth", "conf", "confbridge", "demo", "dir", "pbx", "priv",
            "privacy", "queue", "spy", "ss", "tt", "vm")  # fmt: skip
ICAO = {
    "a": "alpha", "b": "bravo", "c": "charlie", "d": "delta", "e": "echo", "f": "foxtrot",
    "g": "golf", "h": "hotel", "i": "india", "j": "juliet", "k": "kilo", "l": "lima",
    "m": "mike", "n": "november", "o": "oscar", "p": "papa", "q": "quebec", "r": "romeo",
    "s": "sierra", "t": "tango", "u": "uniform", "v": "victor", "w": "whiskey", "x": "x-ray",
    "y": "yankee", "z": "zulu", "9": "niner",
}  # fmt: skip
# accepted transcripts of an isolated letter name (after normalize_words, words joined)
LETTER_NAMES = {
    "a": ("ay", "eh"), "b": ("bee", "be"), "c": ("see", "sea", "cee"), "d": ("dee",),
    "e": ("ee",), "f": ("ef", "eff"), "g": ("gee",), "h": ("aitch", "ach"), "i": ("eye", "aye"),
    "j": ("jay",), "k": ("kay", "okay"), "l": ("el", "ell"), "m": ("em",), "n": ("en",),
    "o": ("oh", "owe"), "p": ("pee", "pea"), "q": ("cue", "queue"), "r": ("are", "ar"),
    "s": ("es", "ess"), "t": ("tee", "tea"), "u": ("you", "yu"), "v": ("vee",),
    "w": ("doubleu", "doubleyou"), "x": ("ex",), "y": ("why", "wye"), "z": ("zee", "zed"),
}  # fmt: skip

# --------------------------------------------------------------------------- numbers

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen")  # fmt: skip
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
            "nine": "ninth", "twelve": "twelfth"}  # fmt: skip


def cardinal(n: int) -> str:
    """US English words of 0 <= n < 10**15, no "and": 1234 -> one thousand two hundred thirty
    four."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + cardinal(rest))
    for value, name in _SCALES:
        if n >= value:
            rest = n % value
            return cardinal(n // value) + " " + name + ("" if rest == 0 else " " + cardinal(rest))
    raise ValueError(n)


def ordinal(n: int) -> str:
    words = cardinal(n).split()
    last = words[-1]
    if last in _ORDINAL:
        words[-1] = _ORDINAL[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def spell_numbers(text: str) -> str:
    """Digits to words (both reference and hypothesis go through this for the ``numbers``
    scores): thousands separators dropped, ordinals (21st), decimals (28.8 -> twenty eight point
    eight), integers (US style, no "and"), % * # & @ as words. Digit strings are read as one
    number (a spoken "one two three four" still differs from "1234")."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: f" {ordinal(int(m.group(1)))} ", text)
    text = re.sub(
        r"\b(\d+)\.(\d+)\b",
        lambda m: (
            f" {cardinal(int(m.group(1)))} point "
            + " ".join(_ONES[int(c)] for c in m.group(2))
            + " "
        ),
        text,
    )
    text = re.sub(r"\d+", lambda m: f" {cardinal(int(m.group(0)))} ", text)
    for sym, word in (("%", "percent"), ("*", "star"), ("#", "pound"), ("&", "and"), ("@", "at")):
        text = text.replace(sym, f" {word} ")
    return text


# --------------------------------------------------------------------------- selection


def read_transcripts(path: Path) -> dict[str, str]:
    """``name: text`` lines of core-sounds-en.txt(.gz) -> {relative stem: text}."""
    raw = gzip.open(path, "rt") if path.suffix == ".gz" else open(path)  # noqa: SIM115
    with raw as f:
        lines = [line.rstrip("\n") for line in f if ":" in line and not line.startswith(";")]
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines)}


def clean_transcript(stem: str, text: str) -> str:
    """The reference: the transcript line, fixed, with stage directions dropped."""
    text = TRANSCRIPT_FIXES.get(stem, text)
    text = re.sub(r"\[[^\]]*\]|<[^>]*>|\([^)]*\)", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def squash(text: str) -> str:
    """Words compared for the name rule: normalized, apostrophes dropped, spaces removed."""
    return "".join(normalize_words(text)).replace("'", "")


def name_words(stem: str) -> str | None:
    """The words a file's name says, or None when its name is not words (ascii123, h-1, ...)."""
    folder, _, base = stem.rpartition("/")
    if folder == "digits" and base.isdigit():
        return cardinal(int(base))
    if folder == "phonetic":
        key = base.removesuffix("_p")
        return ICAO.get(key) if base.endswith("_p") else None
    if folder == "silence" or any(c.isdigit() for c in base):
        return None
    return " ".join(re.split(r"[-_]", base))


def is_letter_name(stem: str) -> bool:
    folder, _, base = stem.rpartition("/")
    return (folder == "letters" and len(base) == 1) or stem in ("digits/a-m", "digits/p-m")


def group_of(stem: str) -> str:
    folder, _, base = stem.rpartition("/")
    if folder:
        return folder
    first = base.split("-", 1)[0]
    if first == "vm":
        return "top:vm-"
    if first in ("conf", "confbridge"):
        return "top:conf-"
    return "top:other-prefix" if first in PREFIXES and "-" in base else "top"


def select(transcripts: dict[str, str], durations: dict[str, float]) -> tuple[dict, dict, dict]:
    """-> (chosen {stem: {set, group, reference}}, rejected {stem: reason}, letters {stem})."""
    chosen: dict[str, dict] = {}
    rejected: dict[str, str] = {}
    letters: dict[str, str] = {}
    for stem in sorted(durations):
        if stem not in transcripts:
            rejected[stem] = "no transcript line"
            continue
        reference = clean_transcript(stem, transcripts[stem])
        if is_letter_name(stem):
            if len(stem.rpartition("/")[2]) == 1:
                letters[stem] = stem.rpartition("/")[2]
            rejected[stem] = "letter name(s): scored as letter accuracy, not WER"
            continue
        if not normalize_words(reference):
            rejected[stem] = f"no speech in the transcript ({transcripts[stem]!r})"
            continue
        if durations[stem] > MAX_SECONDS:
            rejected[stem] = f"{durations[stem]:.1f} s, over Whisper's {MAX_SECONDS:g}-s window"
            continue
        entry = {"group": group_of(stem), "reference": reference, "seconds": durations[stem]}
        words = name_words(stem)
        base = stem.rpartition("/")[2]
        prefix = base.split("-", 1)[0] if "/" not in stem and "-" in base else None
        if words is not None and squash(words) == squash(reference):
            # grouped by folder only (agent-loggedoff says "Agent logged off": its name counts)
            chosen[stem] = entry | {"set": "name", "group": stem.rpartition("/")[0] or "top"}
        elif prefix in PREFIXES and squash(base.split("-", 1)[1]) == squash(reference):
            chosen[stem] = entry | {"set": "prefixed"}
        else:
            chosen[stem] = entry | {"set": "transcript"}
            rejected[stem] = (
                "name is not words" if words is None
                else f"name says {words!r}, transcript {reference!r}"
            )  # fmt: skip
    return chosen, rejected, letters


# --------------------------------------------------------------------------- scoring


def errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word errors, reference words) after normalize_words."""
    n = len(normalize_words(reference))
    return round(word_error_rate(reference, hypothesis) * n), n


def score(rows: list[dict], variant: str) -> dict:
    errs = sum(r[f"errors_{variant}"] for r in rows)
    words = sum(r[f"ref_words_{variant}"] for r in rows)
    return {
        "files": len(rows),
        "reference_words": words,
        "word_errors": errs,
        "corpus_wer": round(errs / max(1, words), 4),
        "mean_wer": round(float(np.mean([r[f"wer_{variant}"] for r in rows])), 4) if rows else None,
        "exact_files": sum(r[f"wer_{variant}"] == 0 for r in rows),
    }


def table(rows: list[dict]) -> dict:
    out = {"all": {v: score(rows, v) for v in ("raw", "numbers")}}
    for group in sorted({r["group"] for r in rows}):
        part = [r for r in rows if r["group"] == group]
        out[group] = {v: score(part, v) for v in ("raw", "numbers")}
    return out


# --------------------------------------------------------------------------- report


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [s for s in ("name", "prefixed", "transcript") if payload["sets"][s]["files"]]
    fig, axes = plt.subplots(
        1, len(sets), figsize=(4.2 * len(sets) + 1, 3.6), squeeze=False,
        gridspec_kw={"width_ratios": [len(payload["sets"][s]["by_group"]) for s in sets]},
    )  # fmt: skip
    for ax, name in zip(axes[0], sets, strict=True):
        groups = payload["sets"][name]["by_group"]
        labels = list(groups)
        x = np.arange(len(labels))
        for offset, variant, color in ((-0.2, "raw", "tab:grey"), (0.2, "numbers", "tab:blue")):
            values = [groups[g][variant]["corpus_wer"] for g in labels]
            bars = ax.bar(x + offset, values, 0.4, color=color, label=f"corpus WER, {variant}")
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ticks = [f"{g}\n({groups[g]['raw']['files']})" for g in labels]
        ax.set_xticks(x, ticks, fontsize=7, rotation=0 if len(labels) < 7 else 30)
        top = max(groups[g][v]["corpus_wer"] for g in labels for v in ("raw", "numbers"))
        ax.set_ylim(0, max(0.2, 1.3 * top))
        ax.set_title(f"'{name}' set: Whisper tiny.en WER (files)", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/asr_asterisk.json"))
    parser.add_argument("--sounds", type=Path, default=SOUNDS)
    parser.add_argument("--transcripts", type=Path, default=TRANSCRIPTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="first N files (a quick check)")
    parser.add_argument(
        "--latency-files", type=int, default=16, help="files transcribed again one per call"
    )
    parser.add_argument("--window", choices=("full", "trimmed"), default="full")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from --out")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    if not args.sounds.is_dir() or not args.transcripts.is_file():
        raise SystemExit(
            f"needs {args.sounds} and {args.transcripts}: apt-get install -y "
            "asterisk-core-sounds-en-wav (its dependency asterisk-core-sounds-en has the text)"
        )
    transcripts = read_transcripts(args.transcripts)
    paths = {str(p.relative_to(args.sounds).with_suffix("")): p
             for p in sorted(args.sounds.rglob("*.wav"))}  # fmt: skip
    cfg = AudioConfig(clip_seconds=None)
    waves = {stem: load_audio(p, cfg) for stem, p in paths.items()}
    durations = {stem: round(len(w) / SAMPLE_RATE, 3) for stem, w in waves.items()}
    chosen, rejected, letters = select(transcripts, durations)
    stems = list(chosen) + list(letters)
    if args.limit:
        stems = stems[: args.limit]
    print(f"{len(paths)} files; {sum(c['set'] == 'name' for c in chosen.values())} name, "
          f"{len(chosen)} with speech, {len(letters)} letters; transcribing {len(stems)}",
          flush=True)  # fmt: skip

    model = Transcriber.packaged(window=args.window)
    t0 = time.perf_counter()
    hyps = model.transcribe([waves[s] for s in stems])
    transcribe_s = time.perf_counter() - t0
    latency = []
    for stem in stems[: args.latency_files]:
        t1 = time.perf_counter()
        model.transcribe([waves[stem]])
        latency.append(time.perf_counter() - t1)

    rows, letter_rows = [], []
    for stem, hyp in zip(stems, hyps, strict=True):
        if stem in letters:
            said = "".join(normalize_words(hyp)).replace("'", "")
            ok = said == letters[stem] or said in LETTER_NAMES[letters[stem]]
            letter_rows.append({"file": f"{stem}.wav", "letter": letters[stem],
                                "hypothesis": hyp, "correct": ok})  # fmt: skip
            continue
        c = chosen[stem]
        row = {"file": f"{stem}.wav", "set": c["set"], "group": c["group"],
               "seconds": c["seconds"], "reference": c["reference"], "hypothesis": hyp}  # fmt: skip
        variants = (
            ("raw", c["reference"], hyp),
            ("numbers", spell_numbers(c["reference"]), spell_numbers(hyp)),
        )
        for variant, ref, h in variants:
            row[f"wer_{variant}"] = round(word_error_rate(ref, h), 4)
            row[f"errors_{variant}"], row[f"ref_words_{variant}"] = errors(ref, h)
        rows.append(row)

    sets = {}
    for name, members in (("name", ("name",)), ("prefixed", ("prefixed",)),
                          ("transcript", ("name", "prefixed", "transcript"))):  # fmt: skip
        part = [r for r in rows if r["set"] in members]
        by_group = table(part)
        overall = by_group.pop("all")
        worst = sorted(part, key=lambda r: (-r["wer_numbers"], -r["errors_numbers"]))[:15]
        sets[name] = {
            "files": len(part),
            "audio_seconds": round(sum(r["seconds"] for r in part), 1),
            "overall": overall,
            "by_group": by_group,
            "worst_15_by_wer_numbers": [
                {k: r[k] for k in ("file", "reference", "hypothesis", "wer_raw", "wer_numbers")}
                for r in worst
            ],
        }
        print(name, json.dumps(overall), flush=True)
    n_letters = len(letter_rows)
    audio_s = sum(durations[s] for s in stems)
    payload = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {
            "weights": model.weights_id,
            "decoding": "greedy, no timestamps",
            "transcriber": model.options.to_dict(),
        },
        "selection_rule": __doc__.split("Two file sets:", 1)[1].split("Scoring:", 1)[0].strip(),
        "scoring": "raw: word_error_rate (normalize_words); numbers: spell_numbers on both "
        "sides first. corpus_wer = summed word errors / summed reference words.",
        "counts": {
            "wav_files": len(paths),
            "name": sum(c["set"] == "name" for c in chosen.values()),
            "prefixed": sum(c["set"] == "prefixed" for c in chosen.values()),
            "transcript": len(chosen),
            "letters": len(letters),
            "excluded": len(paths) - len(chosen) - len(letters),
        },
        "timing": {
            "files": len(stems),
            "audio_seconds": round(audio_s, 1),
            "transcribe_seconds": round(transcribe_s, 1),
            "seconds_per_file_batched": round(transcribe_s / max(1, len(stems)), 3),
            "real_time_factor": round(transcribe_s / max(1e-9, audio_s), 3),
            "batch1_latency_median_s": round(float(np.median(latency)), 3) if latency else None,
            "batch1_latency_files": len(latency),
        },
        "sets": sets,
        "letters": {
            "files": n_letters,
            "correct": sum(r["correct"] for r in letter_rows),
            "accuracy": round(sum(r["correct"] for r in letter_rows) / max(1, n_letters), 4),
            "accepted_spellings": {k: [k, *v] for k, v in LETTER_NAMES.items()},
            "results": letter_rows,
        },
        "name_set_files": [r["file"] for r in rows if r["set"] == "name"],
        "files": rows,
        "excluded_or_not_name": {f"{k}.wav": v for k, v in rejected.items()},
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    png = write_results(args.out, payload, plot, ensure_ascii=False)
    print(f"wrote {args.out} and {png} in {payload['total_seconds']} s")


if __name__ == "__main__":
    main()
