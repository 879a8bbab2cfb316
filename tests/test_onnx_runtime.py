"""Frozen encoders through ONNX Runtime: exported once, cached, parity-checked."""

import pytest
import torch

from modalforge.encoders import create_encoder
from modalforge.encoders.onnx_runtime import OnnxEncoder, ParityError

from .conftest import requires
from .test_encoders_registry import make_batch


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("cnn", {"widths": (8, 16), "image_size": 30}),
        ("bag_of_embeddings", {"vocab_size": 50, "embed_dim": 16}),
        ("tabular_mlp", {"n_features": 3, "hidden": 16}),
    ],
)
def test_onnx_matches_torch_and_is_cached(tmp_path, name, kwargs):
    torch.manual_seed(0)
    enc = create_encoder(name, **kwargs)
    example = make_batch(enc.modality, batch=2)
    runner = OnnxEncoder(enc, example, cache=tmp_path)
    assert runner.path.is_file() and runner.max_abs_diff < 1e-4
    other = make_batch(enc.modality, batch=3, seed=1)  # another batch size
    with torch.no_grad():
        expected = enc(other).pooled
    assert torch.allclose(runner(other).pooled, expected, atol=1e-4)
    stamp = runner.path.stat().st_mtime_ns
    again = OnnxEncoder(enc, example, cache=tmp_path)
    assert again.path == runner.path and again.path.stat().st_mtime_ns == stamp  # reused


def test_a_tampered_cache_fails_parity_and_is_discarded(tmp_path):
    torch.manual_seed(0)
    enc = create_encoder("tabular_mlp", n_features=3, hidden=16)
    example = make_batch(enc.modality, batch=2)
    runner = OnnxEncoder(enc, example, cache=tmp_path)
    torch.manual_seed(1)
    impostor = create_encoder("tabular_mlp", n_features=3, hidden=16)
    fake = OnnxEncoder(impostor, example, cache=tmp_path / "other")
    runner.path.write_bytes(fake.path.read_bytes())
    with pytest.raises(ParityError, match="differs from PyTorch"):
        OnnxEncoder(enc, example, cache=tmp_path)
    assert not runner.path.exists()


@pytest.mark.weights
def test_packaged_encoders_run_in_onnx_runtime(tmp_path):
    from modalforge.data.text import TextConfig, load_tokenizer, tokenize

    image = create_encoder("efficientnet_lite0", image_size=128)
    pixels = {"pixels": torch.randn(2, 3, 128, 128)}
    runner = OnnxEncoder(image, pixels, cache=tmp_path)
    assert runner.max_abs_diff < 1e-3
    bigger = {"pixels": torch.randn(3, 3, 128, 128)}
    with torch.no_grad():
        assert torch.allclose(runner(bigger).pooled, image(bigger).pooled, atol=1e-3)
    text = create_encoder("minilm")
    tok = load_tokenizer("minilm")
    batch = tokenize(
        ["a cat", "a dog on a sofa"], tok, TextConfig(max_length=16, padding="longest")
    )
    runner = OnnxEncoder(text, batch, cache=tmp_path)
    other = tokenize(
        ["the stock market fell sharply today", "hi", "x"], tok, TextConfig(max_length=32)
    )
    with torch.no_grad():
        assert torch.allclose(runner(other).pooled, text(other).pooled, atol=1e-4)


# --------------------------------------------------------------------------- a traceable core


def noisy_waves(lengths, seed=0):
    """Random clips whose padding holds loud noise: the graph must ignore it as PyTorch does."""
    g = torch.Generator().manual_seed(seed)
    waves = 5.0 * torch.rand(len(lengths), max(lengths), generator=g)
    for i, n in enumerate(lengths):
        waves[i, :n] = 0.3 * torch.randn(n, generator=g)
    return {"waves": waves, "wave_lengths": torch.tensor(lengths)}


@pytest.mark.parametrize("window", ["trimmed", "full"])
def test_an_encoder_with_prepare_exports_its_core(tmp_path, window):
    """Whisper's numpy log-mel stays in Python (``prepare``); the graph takes the mel (+ frame
    counts) with dynamic batch (and, trimmed, frame) axes and returns pooled, sequence, mask."""
    import onnx
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from modalforge.encoders.audio import WhisperAudioEncoder

    torch.manual_seed(1)
    config = WhisperConfig(d_model=16, encoder_layers=2, encoder_attention_heads=2,
                           encoder_ffn_dim=24, num_mel_bins=80, max_source_positions=1500)  # fmt: skip
    enc = WhisperAudioEncoder(WhisperEncoder(config), window=window, tail_seconds=0.1)
    runner = OnnxEncoder(enc, noisy_waves([16000, 9000]), with_sequence=True, cache=tmp_path)
    assert runner.core and runner.max_abs_diff < 1e-5
    assert runner.outputs == ("pooled", "sequence", "mask")
    graph = onnx.load(str(runner.path)).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in graph.input}  # fmt: skip
    expected_keys = {"mel", "valid", "attend"} if window == "trimmed" else {"mel", "valid"}
    assert set(inputs) == expected_keys
    assert isinstance(inputs["mel"][0], str) and inputs["mel"][1] == 80
    assert isinstance(inputs["mel"][2], str) if window == "trimmed" else inputs["mel"][2] == 3000
    other = noisy_waves([7000, 30000, 1200], seed=3)  # another batch size and other lengths
    with torch.no_grad():
        expected = enc(other)
    got = runner(other)
    torch.testing.assert_close(got.pooled, expected.pooled, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.sequence, expected.sequence, rtol=0, atol=1e-5)
    assert torch.equal(got.mask, expected.mask) and got.mask.sum(1).tolist() == [22, 94, 4]
    stamp = runner.path.stat().st_mtime_ns
    again = OnnxEncoder(enc, noisy_waves([8000]), with_sequence=True, cache=tmp_path)
    assert not again.exported and again.path.stat().st_mtime_ns == stamp  # reused


def espeak_batch(texts, seconds=None):
    """espeak-ng clips, each cut / zero-padded to ``seconds`` (None: its own length)."""
    from modalforge.data.audio import fit_length
    from modalforge.data.catalog.speech import speak

    waves = [speak(t, voice="en-us", speed=150) for t in texts]
    if seconds is not None:
        waves = [fit_length(w, round(seconds * 16_000)) for w in waves]
    batch = torch.zeros(len(waves), max(len(w) for w in waves))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(w)
    return {"waves": batch, "wave_lengths": torch.tensor([len(w) for w in waves])}


@pytest.mark.weights
@pytest.mark.system
@requires("espeak-ng")
@pytest.mark.parametrize("window", ["trimmed", "full"])
def test_whisper_tiny_en_runs_in_onnx_runtime(tmp_path, window):
    enc = create_encoder("whisper_tiny_en", window=window)
    example = espeak_batch(
        ["open the door and turn on the light", "my favorite color is blue"], 2.0
    )
    runner = OnnxEncoder(enc, example, cache=tmp_path)
    assert runner.max_abs_diff < 1e-3
    # 3 clips of their own lengths (1.1-2.9 s) where the export saw 2 clips of 2 s
    other = espeak_batch(["hi there", "she sells sea shells",
                          "we will meet at the station tomorrow morning"])  # fmt: skip
    assert len(set(other["wave_lengths"].tolist())) == 3
    with torch.no_grad():
        expected = enc(other).pooled
    got = runner(other).pooled
    assert got.shape == (3, 384)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)
