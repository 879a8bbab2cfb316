"""Tiny bundles of every served kind, built from scratch in a few seconds to a minute each, for the
serving tests and for ``benchmarks/fuzz.py`` / ``benchmarks/soak.py`` (which import this module):
the same toy data and recipes as the tests' fixtures, which call the builders here.

``build(kind, root)`` -> a ``Served`` (the bundle folder, the extra ``modalforge serve``
arguments it needs, the environment to serve it in). Kinds: ``KINDS``.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from modalforge.models import EncoderSpec

from .conftest import COLORS, PITCH, WORDS, png_bytes, shade, sine, wav_bytes

KINDS = ("classifier", "contrastive", "caption", "vqa", "transcription", "chat")
CAPTIONS = {"r": "a bright red apple", "g": "a small green leaf", "b": "the deep blue sea"}
#: the captioner's image tower (frozen: its features are cached)
TINY_FROZEN = EncoderSpec("cnn", {"widths": (8, 16), "depth": 1, "image_size": 30}, "frozen")


@dataclass
class Served:
    """A bundle and how to serve it: ``modalforge serve PATH *ARGS`` with ``ENV`` added."""

    kind: str
    path: Path
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


# -- manifests ------------------------------------------------------------------------------------
def contrastive_manifest(root: Path) -> Path:
    """60 rows: a coloured square, its colour's words, a tone of its colour's pitch; the colour's
    words ("red apple") as the zero-shot label too. -> root/manifest.csv"""
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "aud").mkdir(exist_ok=True)
    rows = []
    for i in range(60):
        c = "rgb"[i % 3]
        (root / "img" / f"{i}.png").write_bytes(png_bytes((30, 30), shade(c, i)))
        (root / "aud" / f"{i}.wav").write_bytes(wav_bytes(sine(PITCH[c] + i % 5, 0.25)))
        rows.append({"image": f"img/{i}.png", "text": WORDS[c], "audio": f"aud/{i}.wav",
                     "colour": WORDS[c]})  # fmt: skip
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def caption_manifest(root: Path) -> Path:
    """60 squares in three colours (shades vary), each captioned by its colour's sentence."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(60):
        c = "rgb"[i % 3]
        (root / "img" / f"{i}.png").write_bytes(png_bytes((30, 30), shade(c, i)))
        rows.append({"image": f"img/{i}.png", "text": CAPTIONS[c]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def vqa_manifest(root: Path) -> Path:
    """Coloured squares asked "what colour is this?" and "is this red?" etc. -> root/vqa.csv"""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    names = {"r": "red", "g": "green", "b": "blue"}
    for i in range(60):
        c = "rgb"[i % 3]
        (root / f"{i}.png").write_bytes(png_bytes((30, 30), COLORS[c]))
        rows.append({"image": f"{i}.png", "question": "what colour is this?", "answer": names[c],
                     "qtype": "colour"})  # fmt: skip
        asked = "rgb"[(i // 3) % 3]
        rows.append({"image": f"{i}.png", "question": f"is this {names[asked]}?",
                     "answer": "yes" if asked == c else "no", "qtype": "yes/no"})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "vqa.csv", index=False)
    return root / "vqa.csv"


# -- predictors (unfitted) ------------------------------------------------------------------------
def contrastive_predictor(manifest: Path, epochs: int = 12):
    from modalforge.contrastive import ContrastivePredictor
    from modalforge.predictor import FitConfig
    from modalforge.schema import Schema
    from modalforge.train.module import OptimConfig

    from .serving import TINY

    optim = OptimConfig(lr=3e-3, warmup_ratio=0.0)
    schema = Schema.from_specs(["image=image", "text=text", "audio=audio"])  # 3 words: text
    return ContrastivePredictor("image:text,audio:text", label="colour", encoders=dict(TINY),
                                embed_dim=32, schema=schema, cache_dir=manifest.parent / "cache",
                                fit_config=FitConfig(epochs=epochs, batch_size=16, patience=20,
                                                     optim=optim))  # fmt: skip


def caption_predictor(manifest: Path, epochs: int = 25):
    from modalforge.caption import CaptionPredictor
    from modalforge.predictor import FitConfig
    from modalforge.train.module import OptimConfig

    optim = OptimConfig(lr=3e-3, warmup_ratio=0.0, label_smoothing=0.1)
    return CaptionPredictor("image", "text", TINY_FROZEN, dim=32, layers=1, heads=2, dropout=0.0,
                            max_length=8, cache_dir=manifest.parent / "cache",
                            fit_config=FitConfig(epochs=epochs, batch_size=16, patience=30,
                                                 optim=optim))  # fmt: skip


def vqa_predictor(manifest: Path, epochs: int = 30):
    from modalforge.predictor import FitConfig, MultimodalPredictor
    from modalforge.schema import Schema
    from modalforge.train.module import OptimConfig

    optim = OptimConfig(lr=3e-3, warmup_ratio=0.0)
    return MultimodalPredictor(
        label="answer", columns=["image", "question"], fusion="concat", hidden=64,
        encoders={"image": EncoderSpec("cnn", {"widths": (8, 16), "image_size": 30}, "frozen"),
                  "question": EncoderSpec("bag_of_embeddings", {"embed_dim": 16})},
        cache_dir=manifest.parent / "cache",
        schema=Schema.from_specs(["image=image", "question=text"]),
        fit_config=FitConfig(epochs=epochs, batch_size=16, patience=30, optim=optim),
    )  # fmt: skip


def chat_bundle(root: Path) -> Path:
    """A random 2-layer Gemma with image and audio towers, stage 1 only (one epoch over 16 tiny
    conversations). -> root/"bundle"."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    from modalforge.tasks.chat.data import Conversation, Turn, write_conversations
    from modalforge.tasks.chat.predictor import ChatFitConfig, ChatPredictor

    from .tiny_llm import tiny_gemma, tiny_tokenizer

    towers = dict(image_encoder="cnn", image_kwargs={"image_size": 32}, audio_encoder="audio_cnn",
                  image_tokens=4, audio_tokens=2)  # fmt: skip
    llm = root / "llm"
    tiny_gemma(seed=0).save_pretrained(llm)
    tiny_tokenizer().save_pretrained(llm)
    convs = []
    for k, (name, rgb) in enumerate([("red", (230, 20, 20)), ("green", (20, 200, 20))] * 4):
        Image.new("RGB", (32, 32), rgb).save(root / f"{name}.png")
        sf.write(root / f"{name}.wav", 0.3 * np.sin(np.arange(4000) * (k % 2 + 1) * 0.07), 16000)
        split = "train" if k < 6 else "val"
        convs += [Conversation(f"i{k}", root / f"{name}.png", None, [Turn("user", "<image>\nwhat?"),
                               Turn("assistant", name)], split, "caption"),
                  Conversation(f"a{k}", None, root / f"{name}.wav", [Turn("user", "<audio>\nsaid?"),
                               Turn("assistant", name)], split, "speech")]  # fmt: skip
    data = write_conversations(root / "chat.jsonl", convs)
    fit = ChatFitConfig(batch_size=8, precision="32-true", stage1_epochs=1, stage2_epochs=0)
    chat = ChatPredictor(str(llm), fit=fit, cache_dir=root / "cache", **towers)
    chat.fit(data, out_dir=root / "run", progress=False)
    chat.save(root / "bundle")
    return root / "bundle"


# -- every kind -----------------------------------------------------------------------------------
def build(kind: str, root: Path) -> Served:
    """A tiny bundle of ``kind`` (one of ``KINDS``) under ``root`` (created), ready to serve."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {list(KINDS)}")
    root.mkdir(parents=True, exist_ok=True)
    if kind == "classifier":
        from .serving import train_toy_bundle

        return Served(kind, train_toy_bundle(root))
    if kind == "contrastive":
        manifest = contrastive_manifest(root)
        p = contrastive_predictor(manifest)
        p.fit(manifest, out_dir=root / "run", progress=False)
        path = p.save(root / "clip").path
        subprocess.run([sys.executable, "-m", "modalforge.cli", "index", "build", str(path),
                        "--manifest", str(manifest), "--out", str(root / "idx")],
                       check=True, capture_output=True, timeout=300)  # fmt: skip
        return Served(kind, path, ("--index", str(root / "idx")))
    if kind == "caption":
        manifest = caption_manifest(root)
        p = caption_predictor(manifest)
        p.fit(manifest, out_dir=root / "run", progress=False)
        return Served(kind, p.save(root / "captioner").path)
    if kind == "vqa":
        manifest = vqa_manifest(root)
        p = vqa_predictor(manifest)
        p.fit(manifest, out_dir=root / "run", progress=False)
        return Served(kind, p.save(root / "vqa").path)
    if kind == "transcription":
        from .test_transcribe import tiny_transcriber

        return Served(kind, tiny_transcriber().save(root / "asr").path)
    # fp32 decoding: the same tokens batched or alone (tests/test_chat_serving.py)
    return Served(kind, chat_bundle(root), ("--name", "bundle"),
                  {"MODALFORGE_LLM_QUANTIZE": "none"})  # fmt: skip


__all__ = ["CAPTIONS", "KINDS", "TINY_FROZEN", "Served", "build"]
