"""``CaptionPredictor``: image captioning through the same data pipeline, trainer and bundle as
``MultimodalPredictor``.

    p = CaptionPredictor(image="image", caption="text", decoder="transformer")
    p.fit("data/emoji/manifest.csv")                  # frozen encoder: grids from the cache
    p.caption(["data/emoji/images/1f600.png"])        # ["grinning face"]
    p.evaluate(p.test_manifest, out_dir="runs/caption/report")
    p.save("runs/caption/bundle")

Captions are words and punctuation marks (``WordVocab.split``, lowercased): the vocabulary is
built on the training captions, and references and hypotheses are compared in that form, as
sacrebleu's 13a tokenizer would split them. ``evaluate`` reports BLEU-1..4 and CIDEr-D for
greedy decoding, beam search and the nearest-neighbour baseline (the caption of the training
image closest in the encoder's pooled features, by cosine).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from modalforge.data.manifest import Manifest, is_missing, resolve_path
from modalforge.data.text import WordVocab
from modalforge.encoders import create_encoder
from modalforge.files import atomic_path, atomic_write_json, atomic_write_text
from modalforge.models import EncoderSpec
from modalforge.models.caption import CaptionConfig, CaptionModel, build_caption
from modalforge.models.decoding import DecodeOptions, decode
from modalforge.tasks.base import FitConfig, TaskPredictor
from modalforge.tasks.serving import OPTIONS, ServingAdapter
from modalforge.train.module import CaptionModule

#: the image encoder a captioner starts from: the emoji are 64 px, so 128 px gives a 4x4 grid
DEFAULT_ENCODER = EncoderSpec("efficientnet_lite0", {"image_size": 128})
VOCAB_ASSET = "caption_vocab.json"
EXAMPLES = 12  # images in the report's grid


def caption_words(text: str) -> list[str]:
    """A caption as the tokens it is scored on: lowercased words and punctuation marks."""
    return WordVocab.split(str(text).lower())


def detokenize(words: list[str]) -> str:
    """Tokens back to a readable caption: no space before , : ; . ! ? or around - and '."""
    text = " ".join(words)
    text = re.sub(r" ([,:;.!?])", r"\1", text)
    return re.sub(r" ?([-']) ?", r"\1", text)


class CaptionPredictor(TaskPredictor):
    instead_of_predict = ("a captioning model writes captions: use caption(), `modalforge "
                          "caption`, or /v1/caption and /v1/chat/completions")  # fmt: skip

    def __init__(
        self,
        image: str = "image",
        caption: str = "text",
        encoder: EncoderSpec | str | None = None,
        decoder: str = "transformer",
        decoder_dim: int = 256,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.3,
        max_length: int = 24,
        fit_config: FitConfig | None = None,
        cache_dir: str | Path | None = None,
        on_bad_row: str = "skip",
        schema=None,
        dim: int | None = None,
    ) -> None:
        spec = EncoderSpec(encoder) if isinstance(encoder, str) else encoder or DEFAULT_ENCODER
        super().__init__(label=caption, task="caption", encoders={image: spec}, columns=[image],
                         schema=schema, fit_config=fit_config, cache_dir=cache_dir,
                         on_bad_row=on_bad_row)  # fmt: skip
        self.fit_config.monitor = "val_loss"
        if dim is not None:
            warnings.warn("CaptionPredictor(dim=...) is now decoder_dim=...", DeprecationWarning,
                          stacklevel=2)  # fmt: skip
            decoder_dim = dim
        self.image, self.caption_column = image, caption
        self.decoder, self.decoder_dim = decoder, decoder_dim
        self.layers, self.heads = layers, heads
        self.dropout, self.max_length = dropout, max_length
        self.vocab: WordVocab | None = None
        self.train_manifest: Manifest | None = None  # the nearest-neighbour baseline's captions

    @classmethod
    def from_config(cls, config: dict[str, Any], label: str | None = None, task: str = "caption",
                    cache_dir=None) -> CaptionPredictor:  # fmt: skip
        parsed = CaptionConfig.from_dict(config)
        predictor = cls(parsed.image, parsed.caption, parsed.encoder, parsed.decoder,
                        parsed.decoder_dim,
                        parsed.layers, parsed.heads, parsed.dropout, parsed.max_length,
                        cache_dir=cache_dir)  # fmt: skip
        predictor.config = parsed
        return predictor

    # -- the parts of fit() that differ -----------------------------------------------------
    def _input_specs(self, train_m: Manifest) -> dict[str, EncoderSpec]:
        self.train_manifest = train_m  # its captions make the vocabulary and the baseline
        return super()._input_specs(train_m)

    def _build(self, inputs: dict[str, EncoderSpec]) -> None:
        captions = [str(v) for v in self.train_manifest.frame[self.caption_column]]  # type: ignore[union-attr]
        self.vocab = WordVocab.build(captions)
        spec = inputs[self.image]
        probe = create_encoder(spec.name, **spec.kwargs)  # its grid size sets the config's
        self.config = CaptionConfig(
            self.image, self.caption_column, spec, len(self.vocab), grid=_grid_size(probe),
            decoder=self.decoder, decoder_dim=self.decoder_dim, layers=self.layers,
            heads=self.heads, dropout=self.dropout, max_length=self.max_length,
        )  # fmt: skip
        self.model = build_caption(self.config, probe)

    def _new_model(self) -> CaptionModel:
        return build_caption(self.config)  # type: ignore[arg-type]

    def _module(self, class_weights):
        return CaptionModule(self.model, self.fit_config.optim)

    @property
    def _stratify(self) -> bool:  # every caption is its own class
        return False

    def _row_tensors(self, manifest: Manifest) -> dict[str, torch.Tensor]:
        """Each row's caption as ``<bos> words <eos>`` ids, padded to ``max_length``."""
        captions = [str(v) for v in manifest.frame[self.caption_column]]
        return {"tokens": self.vocab(captions, max_length=self.config.max_length)["input_ids"]}  # type: ignore[misc,union-attr]

    def _cached_features(self, manifest: Manifest, progress: bool = True, columns=None):
        """The frozen image encoder's grid ``(N, grid * D)`` for every row, through the cache
        (kept apart from its pooled features)."""
        if self.image not in self._frozen_columns():
            return {}
        dim = self.config.grid * self.model.encoder(self.image).output_dim  # type: ignore[union-attr]
        return {self.image: self._column_features(manifest, self.image, progress, "grid", dim)}

    def _assets(self) -> dict[str, Any]:
        return {VOCAB_ASSET: self.vocab.to_dict()}  # type: ignore[union-attr]

    def _restore(self, bundle) -> None:
        self.vocab = WordVocab.from_dict(bundle.asset(VOCAB_ASSET))

    # -- captions ---------------------------------------------------------------------------
    @torch.no_grad()
    def memory(self, manifest: Manifest, progress: bool = False) -> torch.Tensor:
        """The decoder's memory for every row of ``manifest``."""
        model = self._require_model().eval()
        cached = self._cached_features(manifest, progress)
        if cached:
            return model.memory(cached[self.image][0])
        return torch.cat([model.memory(inputs=b) for b in self._image_batches(manifest)])

    def caption(
        self, data, options: DecodeOptions | None = None, root=None, progress: bool = False
    ) -> list[str]:
        """A caption for each image of ``data`` (a manifest, a DataFrame, or a list of image
        paths / bytes)."""
        if isinstance(data, list) and not (data and isinstance(data[0], dict)):
            data = pd.DataFrame({self.image: data})
        manifest = self._manifest(data, root)
        return self.captions_from_memory(self.memory(manifest, progress), options)

    def captions_from_memory(self, memory: torch.Tensor, options: DecodeOptions | None = None,
                             model=None) -> list[str]:  # fmt: skip
        """Decode ``memory`` with ``model`` (default: this predictor's; an ONNX variant's
        ``OrtCaptioner`` decodes the same way)."""
        options = options or DecodeOptions(max_length=self.config.max_length)  # type: ignore[union-attr]
        vocab = self.vocab
        ids = decode(model or self.model, memory, vocab.bos_id, vocab.eos_id, options)  # type: ignore[union-attr]
        return [detokenize([vocab.itos[i] for i in row if i > vocab.eos_id or i == vocab.unk_id])  # type: ignore[union-attr]
                for row in ids]  # fmt: skip

    # -- evaluation -------------------------------------------------------------------------
    def nearest_neighbour_captions(self, manifest: Manifest) -> list[str]:
        """The baseline: each image gets the caption of the training image whose pooled
        encoder features are closest (cosine)."""
        if self.train_manifest is None:
            raise ValueError("the nearest-neighbour baseline needs the training rows (fit(), or "
                             "set train_manifest)")  # fmt: skip
        pooled = {
            name: torch.nn.functional.normalize(self._pooled(rows), dim=-1)
            for name, rows in (("train", self.train_manifest), ("query", manifest))
        }
        nearest = (pooled["query"] @ pooled["train"].T).argmax(1).numpy()
        captions = self.train_manifest.frame[self.caption_column].astype(str).to_numpy()
        return [detokenize(caption_words(c)) for c in captions[nearest]]

    @torch.no_grad()
    def _pooled(self, manifest: Manifest) -> torch.Tensor:
        """The image encoder's pooled features of every row (the cached grid's mean when the
        encoder is frozen)."""
        cached = self._cached_features(manifest)
        if cached:
            return cached[self.image][0].view(len(manifest), self.config.grid, -1).mean(1)  # type: ignore[union-attr]
        self._require_model().eval()
        return self._encoded(manifest, self.image)

    def _image_batches(self, manifest: Manifest):
        """Collated batches of the image column, decoded as in training."""
        feat = self._featurizer(self.image)
        values = manifest.frame[self.image].tolist()
        size = self.fit_config.batch_size
        for i in range(0, len(values), size):
            yield feat.collate([feat.load(v, manifest.root) for v in values[i : i + size]])

    def evaluate(
        self,
        data,
        split: str | None = None,
        out_dir: str | Path | None = None,
        ablation: bool = True,
        title: str | None = None,
        beam_width: int = 3,
        length_penalty: float = 0.6,
    ) -> dict[str, Any]:
        """BLEU-1..4 and CIDEr-D (document frequencies from these rows' references) for greedy
        decoding, beam search and the nearest-neighbour baseline. With ``out_dir``:
        ``report.md``, ``metrics.json``, ``captions.csv`` and ``captions.png``."""
        from modalforge.evaluate.text_metrics import cider_d, corpus_bleu

        manifest = self.evaluation_rows(data, split)
        refs = [[" ".join(caption_words(c))]
                for c in manifest.frame[self.caption_column].astype(str)]  # fmt: skip
        memory = self.memory(manifest)
        length = self.config.max_length  # type: ignore[union-attr]
        hyps = {
            "greedy": self.captions_from_memory(memory, DecodeOptions("greedy", max_length=length)),
            f"beam {beam_width}": self.captions_from_memory(
                memory, DecodeOptions("beam", beam_width, length_penalty, max_length=length)),
        }  # fmt: skip
        if self.train_manifest is not None:
            hyps["nearest neighbour"] = self.nearest_neighbour_captions(manifest)
        scores = {}
        for name, captions in hyps.items():
            tokens = [" ".join(caption_words(c)) for c in captions]
            bleu = corpus_bleu(tokens, refs)
            scores[name] = {
                **{f"bleu{n + 1}": b for n, b in enumerate(bleu.bleu)},
                "cider_d": cider_d(tokens, refs).score,
                "exact": float(np.mean([t == r[0] for t, r in zip(tokens, refs, strict=True)])),
                "mean_words": float(np.mean([len(t.split()) for t in tokens])),
            }
        known = set(self.vocab.itos)  # type: ignore[union-attr]
        words = [w for r in refs for w in r[0].split()]
        result = {
            "rows": len(manifest),
            "scores": scores,
            "reference_words_in_vocabulary": float(np.mean([w in known for w in words])),
            "headline": {f"{metric} {name}": s[metric] for name, s in scores.items()
                         for metric in ("bleu4", "cider_d")},
            "decoding": {"beam_width": beam_width, "length_penalty": length_penalty},
        }  # fmt: skip
        if out_dir is not None:
            result["report"] = str(self._write_report(Path(out_dir), manifest, hyps, result,
                                                      title))  # fmt: skip
        return result

    def _write_report(self, out: Path, manifest: Manifest, hyps: dict[str, list[str]],
                      result: dict[str, Any], title: str | None) -> Path:  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        table = pd.DataFrame({"image": manifest.frame[self.image].astype(str),
                              "reference": manifest.frame[self.caption_column].astype(str),
                              **hyps})  # fmt: skip
        with atomic_path(out / "captions.csv") as tmp:
            table.to_csv(tmp, index=False)
        lines = [f"# {title or 'modalforge: image captioning'}", "",
                 f"{result['rows']} held-out images; "
                 f"{result['reference_words_in_vocabulary']:.1%} of their reference words are in "
                 f"the training captions' vocabulary ({len(self.vocab)} tokens).", "",  # type: ignore[arg-type]
                 "| decoding | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | CIDEr-D | exact | words |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, s in result["scores"].items():
            lines.append(f"| {name} | {s['bleu1']:.4f} | {s['bleu2']:.4f} | {s['bleu3']:.4f} | "
                         f"{s['bleu4']:.4f} | {s['cider_d']:.4f} | {s['exact']:.3f} | "
                         f"{s['mean_words']:.2f} |")  # fmt: skip
        lines += ["", "BLEU: corpus BLEU with clipped n-gram counts, the brevity penalty against "
                  "the closest reference and no smoothing (sacrebleu's numbers with tokenize "
                  "none); CIDEr-D as coco-caption computes it."]  # fmt: skip
        png = _examples(out / "captions.png", manifest, self.image, self.caption_column, hyps)
        lines += ["", f"![examples]({png.name})", "", "Every caption: `captions.csv`."]
        path = out / "report.md"
        atomic_write_text(path, "\n".join(lines) + "\n")
        atomic_write_json(out / "metrics.json", result, point="report", default=str)
        return path


def _grid_size(encoder) -> int:
    """Positions in the encoder's grid at its preprocessing size."""
    size = int(encoder.preprocessing.get("size", 224))
    with torch.no_grad():
        out = encoder.eval()({"pixels": torch.zeros(1, 3, size, size)})
    return 1 if out.sequence is None else int(out.sequence.shape[1])


def _examples(path: Path, manifest: Manifest, image: str, caption: str,
              hyps: dict[str, list[str]]) -> Path:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    picks = np.linspace(0, len(manifest) - 1, min(EXAMPLES, len(manifest))).astype(int)
    cols = 4
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    frame = manifest.frame
    for ax, i in zip(axes.flat, picks, strict=False):
        value = frame[image].iloc[i]
        if not is_missing(value):
            with Image.open(resolve_path(manifest.root, value)) as im:
                ax.imshow(im.convert("RGBA"))
        lines = [f"ref: {frame[caption].iloc[i]}"]
        lines += [f"{name}: {captions[i]}" for name, captions in hyps.items()]
        ax.set_title("\n".join(line[:46] for line in lines), fontsize=8, loc="left")
    fig.suptitle("held-out images: reference and generated captions", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path


def from_options(options, encoders, fit: FitConfig, schema) -> CaptionPredictor:
    """``modalforge train --task caption``'s options -> a predictor."""
    if not options.caption:
        raise ValueError("--task caption needs the caption column (--caption)")
    image = (options.columns or ["image"])[0]
    spec = encoders.get(image) or encoders.get("image") or DEFAULT_ENCODER
    return CaptionPredictor(image, options.caption, spec, decoder=options.decoder,
                            decoder_dim=options.decoder_dim, layers=options.decoder_layers,
                            dropout=options.decoder_dropout, fit_config=fit,
                            cache_dir=options.cache_dir, schema=schema,
                            on_bad_row=options.on_bad_row)  # fmt: skip


class CaptionServing(ServingAdapter):
    """``/v1/caption`` and ``/v1/chat/completions``: each image's caption, decoded as the request
    asks (``DecodeOptions``)."""

    options_type = DecodeOptions

    def encoders(self) -> dict[str, Any]:
        config = self.predictor.config
        return {config.image: config.encoder}

    def card_extra(self) -> dict[str, Any]:
        config = self.predictor.config
        return {"decoder": config.decoder, "max_tokens": config.max_length - 1}

    @property
    def max_length(self) -> int:
        return int(self.predictor.config.max_length)

    def chat_fields(self, question: str, image: bytes, options: dict[str, Any]) -> dict[str, Any]:
        """A chat message's image (its text is the prompt, counted, not conditioned on: the
        captioner reads the image only) -> the request fields."""
        return {self.engine.inputs[0].name: image, OPTIONS: options}

    def chat_text(self, result: dict[str, Any]) -> str:
        return result["caption"]

    def predict(self, samples: list) -> list[dict[str, Any]]:
        """Each image's caption: the encoder once over the batch (in tuned chunks), then the
        decoder per group of requests that asked for the same decoding."""
        engine = self.engine
        column = engine.inputs[0]
        rows = list(range(len(samples)))
        memory = [None] * len(samples)
        for chunk in engine.chunks(column, rows, samples):
            batch = engine.featurizers[column.name].collate([samples[i].values[column.name]
                                                             for i in chunk])  # fmt: skip
            for i, m in zip(chunk, engine.model.memory(inputs=engine.to_device(batch)),
                            strict=True):  # fmt: skip
                memory[i] = m
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(tuple(sorted((s.options or {}).items())), []).append(i)
        out: list[dict[str, Any]] = [{} for _ in samples]
        for key, members in groups.items():
            options = DecodeOptions(**{"max_length": self.max_length, **dict(key)})
            texts = self.predictor.captions_from_memory(torch.stack([memory[i] for i in members]),
                                                        options, model=engine.model)  # fmt: skip
            for i, text in zip(members, texts, strict=True):
                out[i] = {"caption": text, "modalities": [column.name],
                          "decoding": {"method": options.method}}  # fmt: skip
        return out


__all__ = ["CaptionPredictor", "CaptionServing", "caption_words", "detokenize", "from_options"]
