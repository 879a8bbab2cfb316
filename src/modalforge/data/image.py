"""Image preprocessing: bytes or a path in, a normalized ``(3, H, W)`` float tensor out.

Pure functions shared by training and serving. Decoding checks the pixel count from the header
before any pixel is decoded, so a 50,000 x 50,000 "decompression bomb" costs nothing.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from modalforge.data.errors import DecodeError

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
DEFAULT_MAX_PIXELS = 40_000_000  # ~6300 x 6300; PIL's own bomb limit is 89 M
MAX_ASPECT = 100.0  # longer side / shorter side: a 1 x 300,000 strip is no picture of anything

# mean / std on the 0..255 scale: tensor = (pixel - mean) / std
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # EfficientNet-Lite (TF-ported weights): (x - 127) / 128
    "efficientnet_lite": ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
    # torchvision / ImageNet statistics
    "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    # CLIP statistics
    "clip": ((122.7709, 116.7460, 104.0937), (68.5005, 66.6322, 70.3232)),
    # (x - 0.5) / 0.5, what many ViT checkpoints use (timm's "inception" statistics)
    "inception": ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
    # plain [0, 1]
    "unit": ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0)),
}

Fit = Literal["crop", "pad", "stretch"]


@dataclass(frozen=True)
class ImageConfig:
    """How an encoder wants its images.

    size: output height and width.
    fit: ``crop`` scales the shorter side to ``size / crop_pct`` and center-crops; ``pad`` scales
      the longer side to ``size`` and pads with ``background``; ``stretch`` ignores aspect ratio.
    """

    size: int = 224
    fit: Fit = "crop"
    crop_pct: float = 1.0
    normalization: str = "efficientnet_lite"
    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"image size must be positive, got {self.size}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {self.normalization!r} "
                f"(choose from {sorted(NORMALIZATIONS)})"
            )
        if self.fit not in ("crop", "pad", "stretch"):
            raise ValueError(f"unknown fit {self.fit!r} (choose crop, pad or stretch)")


def decode_image(
    source: bytes | str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
    max_aspect: float = MAX_ASPECT,
) -> Image.Image:
    """Decode PNG / JPEG / WebP / GIF (first frame) / BMP / TIFF into an RGB image.

    EXIF orientation is applied; transparency is composited onto ``background``.
    Raises DecodeError for anything that is not a decodable image within ``max_pixels`` and
    ``max_aspect`` (both checked from the header, before any pixel is decoded), or whose pixel
    data is shorter than its header says.
    """
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes | bytearray) else open(source, "rb")  # noqa: SIM115
    except OSError as err:
        raise DecodeError(f"cannot open image: {err.strerror or err}") from err
    with stream:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(stream)
                if img.format not in ALLOWED_FORMATS:
                    raise DecodeError(f"unsupported image format {img.format}")
                width, height = img.size
                if width < 1 or height < 1:
                    raise DecodeError(f"image has no pixels ({width}x{height})")
                if width * height > max_pixels:
                    raise DecodeError(
                        f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                        f"{max_pixels:,} (a decompression-bomb guard)"
                    )
                if max(width, height) > max_aspect * min(width, height):
                    raise DecodeError(
                        f"image is {width:,}x{height:,}: its aspect ratio is over the limit of "
                        f"{max_aspect:g}:1"
                    )
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                img.load()
                if img.format == "PNG":
                    stream.seek(0)
                    check_png_data(stream.read(), width, height)
                img = ImageOps.exif_transpose(img) or img
                return to_rgb(img, background)
        except DecodeError:
            raise
        except UnidentifiedImageError:
            raise DecodeError("not an image, or an image format that cannot be read") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DecodeError(f"image too large: {err}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            # PIL reports truncated / corrupt data as OSError or SyntaxError
            raise DecodeError(f"corrupt or truncated image: {err}") from None


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))  # fmt: skip


def check_png_data(data: bytes, width: int, height: int) -> None:
    """Raise DecodeError when a PNG's compressed pixel data holds fewer bytes than its header's
    size needs (PIL fills such a truncated or forged image with black without a word for some
    shapes). Counts the inflated bytes without keeping them."""
    import zlib

    if len(data) < 33:
        raise DecodeError("corrupt or truncated image: PNG header cut short")
    depth, colour, interlace = data[24], data[25], data[28]
    channels = _PNG_CHANNELS.get(colour)
    if channels is None:
        raise DecodeError(f"corrupt image: PNG colour type {colour} does not exist")

    def rows(w: int, h: int) -> int:
        return 0 if w <= 0 or h <= 0 else h * (1 + (w * channels * depth + 7) // 8)

    if interlace:
        passes = ((-(-(width - x) // dx), -(-(height - y) // dy)) for x, y, dx, dy in _ADAM7)
        need = sum(rows(w, h) for w, h in passes)
    else:
        need = rows(width, height)
    inflate, got, pos = zlib.decompressobj(), 0, 8
    try:
        while pos + 8 <= len(data) and got < need:
            size = int.from_bytes(data[pos : pos + 4], "big")
            kind = data[pos + 4 : pos + 8]
            if kind == b"IDAT":
                chunk = data[pos + 8 : pos + 8 + size]
                while chunk and got < need:
                    got += len(inflate.decompress(chunk, 1 << 20))
                    chunk = inflate.unconsumed_tail
            elif kind == b"IEND":
                break
            pos += 12 + size
    except zlib.error as err:
        raise DecodeError(f"corrupt image: PNG pixel data does not inflate ({err})") from None
    if got < need:
        raise DecodeError(
            f"corrupt or truncated image: the PNG header says {width}x{height}, which needs "
            f"{need:,} bytes of pixel data, but it holds {got:,}"
        )


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode to RGB; alpha (including palette transparency) composited on ``background``."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / top)).astype(np.uint8), mode="L")
    return img.convert("RGB")


def resize_image(img: Image.Image, cfg: ImageConfig) -> Image.Image:
    """Scale and crop / pad to ``cfg.size`` x ``cfg.size`` (bicubic, antialiased)."""
    size = cfg.size
    width, height = img.size
    if cfg.fit == "stretch":
        return img.resize((size, size), Image.Resampling.BICUBIC)
    if cfg.fit == "pad":
        scale = size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = Image.new("RGB", (size, size), cfg.background)
        canvas.paste(img.resize(new, Image.Resampling.BICUBIC),
                     ((size - new[0]) // 2, (size - new[1]) // 2))  # fmt: skip
        return canvas
    target = round(size / cfg.crop_pct)
    scale = target / min(width, height)
    new = (max(target, round(width * scale)), max(target, round(height * scale)))
    if new[0] * new[1] > 16 * target * target:
        # a very long strip: scale only the central crop, in the source's own pixels (scaling
        # all of a 1 x 1,000,000 upload would make a 224 x 224,000,000 image)
        box_w, box_h = min(width, size / scale), min(height, size / scale)
        left, top = (width - box_w) / 2, (height - box_h) / 2
        return img.resize((size, size), Image.Resampling.BICUBIC,
                          box=(left, top, left + box_w, top + box_h))  # fmt: skip
    if new != (width, height):
        img = img.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image, normalization: str = "efficientnet_lite") -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) normalized with a named preset."""
    mean, std = NORMALIZATIONS[normalization]
    arr = np.asarray(img, dtype=np.float32)  # (H, W, 3)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def preprocess_image(source: bytes | str | Path | Image.Image, cfg: ImageConfig) -> torch.Tensor:
    """Decode (unless given a PIL image), resize and normalize: -> (3, size, size) float32."""
    if isinstance(source, Image.Image):
        img = to_rgb(source, cfg.background)
    else:
        img = decode_image(source, cfg.max_pixels, cfg.background)
    return to_tensor(resize_image(img, cfg), cfg.normalization)
