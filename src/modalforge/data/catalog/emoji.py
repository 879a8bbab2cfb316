"""``emoji``: Noto emoji images (64 px), their names as text, the names spoken by espeak-ng.

Source: npm ``emoji-datasource-google@16.0.0`` (MIT; images Noto Emoji, Apache-2.0).
Labels: ``category`` (8 classes without Flags) and ``subcategory`` (95). Rows: 1,636 by default.

Choices, and why:
- ``Component`` (the five skin-tone swatches) is dropped: they are modifiers, not emoji.
- ``Flags`` is dropped by default (``include_flags=True`` keeps its 270 rows): 258 of them are
  country flags named only by the country. For ``category`` they are a trivially separable
  class (every name ends in "Flag"), and for retrieval or captioning each is a single example
  whose name cannot be told from a 64-px picture without memorizing the world's flags: they
  would measure flag trivia, not multimodal learning.
- Skin-tone variants are off by default (``variants=True`` adds ~1,900 rows). Every row carries
  a ``group`` (the base emoji's code point), and the ``split`` column keeps a group together, so
  a variant never lands on the other side of a split from its base.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pandas as pd

from modalforge.data.audio import SAMPLE_RATE
from modalforge.data.catalog import BuildResult, register_dataset
from modalforge.data.catalog._common import (
    Timer,
    parallel_map,
    reuse_build,
    start_build,
    write_flac,
    write_meta,
)
from modalforge.data.catalog.npm import fetch_tarball
from modalforge.data.catalog.speech import pick_voice, speak
from modalforge.data.manifest import write_manifest
from modalforge.data.split import stratified_split
from modalforge.files import atomic_write_bytes, cache_dir

PACKAGE = "emoji-datasource-google"
VERSION = "16.0.0"
INTEGRITY = (
    "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88C"
    "jZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A=="
)
IMAGE_DIR = "package/img/google/64/"
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}
RECIPE_VERSION = 1


def emoji_rows(entries: list[dict], include_flags: bool, variants: bool) -> list[dict]:
    """Select and describe the rows from ``emoji.json`` entries (no I/O)."""
    rows = []
    for e in sorted(entries, key=lambda e: e.get("sort_order", 0)):
        if not e.get("has_img_google") or e["category"] == "Component":
            continue
        if e["category"] == "Flags" and not include_flags:
            continue
        name = " ".join(str(e["name"]).lower().split())
        base = {"category": e["category"], "subcategory": e["subcategory"], "group": e["unified"]}
        rows.append({"id": e["unified"], "image_file": e["image"], "text": name, **base})
        if not variants:
            continue
        for tones, var in sorted((e.get("skin_variations") or {}).items()):
            if not var.get("has_img_google"):
                continue
            tone_names = [SKIN_TONES.get(t, t) for t in tones.split("-")]
            text = f"{name}: {', '.join(dict.fromkeys(tone_names))}"
            rows.append({"id": var["unified"], "image_file": var["image"], "text": text, **base})
    return rows


@register_dataset("emoji", "1,636 Noto emoji: 64-px image, name, spoken name; category/subcategory")
def build_emoji(
    out: Path,
    include_flags: bool = False,
    variants: bool = False,
    seed: int = 0,
    workers: int | None = None,
    tarball: Path | None = None,
) -> BuildResult:
    """Build (or bring up to date) the emoji dataset in ``out``.

    tarball: a local copy of the npm package (checked against the pinned integrity); by default
    it is fetched into the cache (see ``npm.fetch_tarball``).
    """
    recipe = {
        "builder": "emoji",
        "recipe_version": RECIPE_VERSION,
        "package": f"{PACKAGE}@{VERSION}",
        "integrity": INTEGRITY,
        "include_flags": include_flags,
        "variants": variants,
        "seed": seed,
        "sample_rate": SAMPLE_RATE,
    }

    with Timer() as timer:
        if (done := reuse_build("emoji", out, recipe, ("image", "audio"))) is not None:
            return done
        tgz = (
            _checked_tarball(tarball)
            if tarball is not None
            else fetch_tarball(PACKAGE, VERSION, INTEGRITY, cache_dir() / "npm")
        )
        start_build(out, recipe, ["images", "audio"])
        entries, images = _read_package(tgz)
        rows = emoji_rows(entries, include_flags, variants)
        missing = sorted({r["image_file"] for r in rows} - set(images))
        if missing:
            raise RuntimeError(
                f"{len(missing)} images missing from the package, e.g. {missing[:3]}"
            )
        for r in rows:
            target = out / "images" / r["image_file"]
            if not target.is_file():
                atomic_write_bytes(target, images[r["image_file"]], durable=False)

        def synthesize(row: dict) -> dict:
            voice = pick_voice(row["id"], seed)
            target = out / "audio" / f"{row['id'].lower()}.flac"
            if not target.is_file():
                write_flac(target, speak(row["text"], **voice), SAMPLE_RATE)
            return voice

        parallel_map(
            synthesize, rows, "speaking names (espeak-ng)", workers or max(2, os.cpu_count() or 2)
        )
        frame = pd.DataFrame(
            {
                "id": [r["id"] for r in rows],
                "image": [f"images/{r['image_file']}" for r in rows],
                "text": [r["text"] for r in rows],
                "audio": [f"audio/{r['id'].lower()}.flac" for r in rows],
                "category": [r["category"] for r in rows],
                "subcategory": [r["subcategory"] for r in rows],
                "group": [r["group"] for r in rows],
            }
        )
        frame["split"] = stratified_split(
            frame["category"].tolist(), seed=seed, groups=frame["group"].tolist()
        )
        write_manifest(frame, out / "manifest.csv")
        write_meta(out, {
            "name": "emoji",
            "recipe": recipe,
            "rows": len(frame),
            "label_columns": ["category", "subcategory"],
            "class_counts": frame["category"].value_counts().to_dict(),
            "splits": frame["split"].value_counts().to_dict(),
            "sources": {
                "images": f"npm {PACKAGE}@{VERSION} (package MIT; images Noto Emoji, Apache-2.0)",
                "text": "the emoji's Unicode name, lower-cased",
                "audio": "the name spoken by espeak-ng (voice/speed/pitch chosen per emoji from a "
                "seeded hash), resampled to 16 kHz mono FLAC",
            },
        })  # fmt: skip
    return BuildResult("emoji", out / "manifest.csv", len(frame), timer.seconds, reused=False)


def _read_package(tgz: Path) -> tuple[list[dict], dict[str, bytes]]:
    """One pass over the gzipped tarball: ``emoji.json`` and every 64-px PNG (~15 MB)."""
    entries, images = None, {}
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            if member.name == "package/emoji.json":
                entries = json.loads(tar.extractfile(member).read())
            elif member.name.startswith(IMAGE_DIR) and member.name.endswith(".png"):
                images[member.name[len(IMAGE_DIR) :]] = tar.extractfile(member).read()
    if entries is None:
        raise RuntimeError(f"{tgz}: no package/emoji.json inside; not the {PACKAGE} package")
    return entries, images


def _checked_tarball(path: Path) -> Path:
    from modalforge.data.catalog.npm import IntegrityError, sri_sha512

    actual = sri_sha512(path)
    if actual != INTEGRITY:
        raise IntegrityError(f"{path}: integrity {actual} is not the pinned {INTEGRITY}")
    return path
