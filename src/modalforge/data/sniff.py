"""Tell a file's modality from its name or its first bytes (content sniffing)."""

from __future__ import annotations

from pathlib import Path

from modalforge.schema import Modality

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3"})
GRAPH_EXTENSIONS = frozenset({".graph.json", ".graphjson"})


def modality_from_name(name: str) -> Modality | None:
    lower = name.lower().strip()
    if any(lower.endswith(ext) for ext in GRAPH_EXTENSIONS):
        return Modality.GRAPH
    suffix = Path(lower).suffix
    if suffix in IMAGE_EXTENSIONS:
        return Modality.IMAGE
    if suffix in AUDIO_EXTENSIONS:
        return Modality.AUDIO
    return None


def modality_from_bytes(head: bytes) -> Modality | None:
    """Magic numbers of the image and audio containers we decode."""
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM",
                        b"II*\0", b"MM\0*")):  # fmt: skip
        return Modality.IMAGE
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Modality.IMAGE
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return Modality.AUDIO
    if head.startswith((b"fLaC", b"OggS", b"ID3")):
        return Modality.AUDIO
    # an MPEG audio frame: 11 sync bits, then a version and a layer that are not "reserved"
    sync = len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0
    if sync and head[1] & 0x18 != 0x08 and head[1] & 0x06:
        return Modality.AUDIO
    if head.lstrip()[:1] == b"{" and b'"edges"' in head:
        return Modality.GRAPH
    return None


def sniff_file(path: Path, n: int = 512) -> Modality | None:
    try:
        with path.open("rb") as f:
            return modality_from_bytes(f.read(n))
    except OSError:
        return None
