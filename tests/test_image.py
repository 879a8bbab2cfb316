import io

import numpy as np
import pytest
import torch
from PIL import Image

from modalforge.data.errors import DecodeError
from modalforge.data.image import (
    ImageConfig,
    decode_image,
    preprocess_image,
    resize_image,
    to_tensor,
)

from .conftest import png_bytes


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_formats_decode_to_rgb(fmt):
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)
    r, g, b = out.getpixel((20, 15))
    assert r > 200 and g < 60 and b < 60


def test_shapes_and_golden_values_efficientnet_lite():
    # a uniform (255, 127, 0) image: (x - 127) / 128 gives exactly 1.0, 0.0, -0.9921875
    cfg = ImageConfig(size=30, normalization="efficientnet_lite")
    x = preprocess_image(png_bytes((60, 45), (255, 127, 0)), cfg)
    assert x.shape == (3, 30, 30) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.tensor(1.0))
    assert torch.allclose(x[1], torch.tensor(0.0))
    assert torch.allclose(x[2], torch.tensor(-127 / 128))


def test_value_range_per_normalization():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8))
    unit = to_tensor(noise, "unit")
    assert unit.min() >= 0 and unit.max() <= 1
    lite = to_tensor(noise, "efficientnet_lite")
    assert lite.min() >= -127 / 128 - 1e-6 and lite.max() <= 1.0 + 1e-6
    imagenet = to_tensor(Image.new("RGB", (4, 4), (124, 116, 104)), "imagenet")
    assert imagenet.abs().max() < 0.01  # ImageNet mean pixel -> ~0


def test_rgba_is_composited_on_white():
    transparent = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    half = Image.new("RGBA", (10, 10), (0, 0, 0, 128))
    assert decode_image(encode(transparent, "PNG")).getpixel((5, 5)) == (255, 255, 255)
    assert decode_image(encode(half, "PNG")).getpixel((5, 5)) == pytest.approx(
        (127, 127, 127), abs=1
    )


def test_palette_transparency_and_gif_first_frame():
    frames = [Image.new("P", (8, 8), i) for i in (1, 2)]
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9)
    for f in frames:
        f.putpalette(palette)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (255, 0, 0)  # frame 0 is red


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_resize_crop_pad_stretch():
    wide = Image.new("RGB", (200, 100), (0, 255, 0))
    assert resize_image(wide, ImageConfig(size=32, fit="crop")).size == (32, 32)
    padded = resize_image(wide, ImageConfig(size=32, fit="pad"))
    assert padded.size == (32, 32) and padded.getpixel((16, 0)) == (255, 255, 255)
    assert padded.getpixel((16, 16)) == (0, 255, 0)
    assert resize_image(wide, ImageConfig(size=32, fit="stretch")).size == (32, 32)
    center = resize_image(wide, ImageConfig(size=64, crop_pct=0.5))
    assert center.size == (64, 64)


def test_truncated_and_garbage_images_raise_decode_error():
    data = png_bytes((64, 64))
    with pytest.raises(DecodeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(DecodeError, match="not an image"):
        decode_image(b"definitely not an image")
    with pytest.raises(DecodeError, match="cannot open"):
        decode_image("/nonexistent/file.png")


def test_decompression_bomb_is_refused_from_the_header():
    # a valid PNG claiming 50,000 x 50,000 pixels with a tiny compressed payload
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(DecodeError, match=r"limit|too large"):
        decode_image(data)
    with pytest.raises(DecodeError, match="limit"):
        decode_image(png_bytes((100, 100)), max_pixels=5_000)


def test_config_validation():
    with pytest.raises(ValueError, match="normalization"):
        ImageConfig(normalization="nope")
    with pytest.raises(ValueError, match="crop_pct"):
        ImageConfig(crop_pct=0)
