"""Frozen encoders through ONNX Runtime: exported once, cached, parity-checked."""

import pytest
import torch

from modalforge.encoders import create_encoder
from modalforge.encoders.onnx_runtime import OnnxEncoder, ParityError

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
