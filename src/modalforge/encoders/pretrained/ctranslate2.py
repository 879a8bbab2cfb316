"""A reader for CTranslate2's ``model.bin`` (binary versions 1-6), in NumPy, without ctranslate2.

The layout (little-endian), as CTranslate2's ``Model::load`` reads it:

    u32 binary version
    [version >= 2]  string spec name (e.g. "WhisperSpec"), u32 spec revision
    u32 variable count, then per variable:
        string name            e.g. "encoder/layer_0/self_attention/linear_0/weight"
        u8 rank, rank x u32 dims
        [version >= 4]  u8 dtype id (table below), u32 byte count
        [version <  4]  u8 item size (4 f32, 2 i16, 1 i8), u32 *element* count
        the raw bytes
    [version >= 3]  u32 alias count, then (string alias, string target) pairs

A string is a u16 length that counts a trailing NUL, then the bytes. Scalars (rank 0) hold the
model's settings (``encoder/num_heads``, ``decoder/activation``, ...). Quantized weights (int8 /
int16) come with a ``<name>_scale`` variable; ``dequantize`` turns them back into floats.

Every read is bounds-checked: a truncated, corrupt or foreign file raises ``CT2FormatError``
saying what was being read, at which byte offset, and how large the file is.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modalforge.files import atomic_write_bytes

#: the newest binary version this reader knows (CTranslate2 4.x writes 6)
MAX_BINARY_VERSION = 6
MAX_RANK = 8

# CTranslate2's DataType enum -> NumPy dtype. bfloat16 has no NumPy type: it is widened to f32.
DTYPES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16",
                          5: "bfloat16"}  # fmt: skip
_NUMPY = {"float32": np.float32, "int8": np.int8, "int16": np.int16, "int32": np.int32,
          "float16": np.float16, "bfloat16": np.uint16}  # fmt: skip
_DTYPE_IDS = {name: i for i, name in DTYPES.items()}
_LEGACY_ITEM_SIZES = {4: "float32", 2: "int16", 1: "int8"}  # binary versions 1-3


class CT2FormatError(ValueError):
    """The file is not a (supported, intact) CTranslate2 model.bin."""


@dataclass
class CT2Model:
    """What a ``model.bin`` holds. ``variables`` maps name -> array (bfloat16 already widened to
    float32, see ``stored_dtypes`` for what the file had); ``aliases`` maps alias -> name."""

    binary_version: int
    spec: str
    spec_revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    stored_dtypes: dict[str, str] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def resolve(self, name: str) -> str:
        return self.aliases.get(name, name)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.variables[self.resolve(name)]
        except KeyError:
            raise KeyError(
                f"variable {name!r} not in the {self.spec or 'CTranslate2'} model"
            ) from None

    def scalar(self, name: str) -> int | float:
        value = self[name]
        if value.ndim != 0:
            raise CT2FormatError(f"{name} should be a scalar, has shape {value.shape}")
        return value.item()

    def dequantize(self, name: str) -> np.ndarray:
        """The variable as float32; int8 / int16 weights are divided by their ``_scale``
        (per output row for int8, one number for int16), as CTranslate2's Dequantize does."""
        value = self[name]
        if value.dtype.kind == "f":
            return value.astype(np.float32, copy=False)
        scale_name = self.resolve(name) + "_scale"
        if scale_name not in self.variables:
            raise CT2FormatError(f"{name} is {value.dtype} without a {scale_name} to dequantize it")
        scale = self.variables[scale_name].astype(np.float32)
        if scale.ndim == 1 and value.ndim >= 1:
            scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
        return value.astype(np.float32) / scale


class _Cursor:
    def __init__(self, data: memoryview, source: str) -> None:
        self.data, self.pos, self.source = data, 0, source

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise CT2FormatError(
                f"{self.source} is truncated or corrupt: needed {n:,} bytes for {what} at offset "
                f"{self.pos:,}, but the file has {len(self.data):,} bytes"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", f"the length of {what}")
        raw = bytes(self.take(n, what))
        if n == 0 or raw[-1] != 0:
            raise CT2FormatError(
                f"{self.source}: {what} at offset {self.pos - n:,} is not a NUL-terminated "
                "string (not a CTranslate2 model.bin?)"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CT2FormatError(f"{self.source}: {what} is not UTF-8: {raw[:40]!r}") from None


def read_ct2_model(path: str | Path) -> CT2Model:
    """Read a ``model.bin`` (or the folder holding it) into NumPy arrays. The arrays are views of
    one writable buffer read from the file (no second copy)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"no CTranslate2 model file at {path}")
    buf = bytearray(path.read_bytes())
    return parse_ct2_model(buf, source=str(path))


def parse_ct2_model(data: bytes | bytearray, source: str = "model.bin") -> CT2Model:
    """Parse the bytes of a ``model.bin`` (see the module docstring for the layout)."""
    cur = _Cursor(memoryview(data), source)
    version = cur.unpack("I", "the binary version")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise CT2FormatError(
            f"{source}: binary version {version} is not supported (this reader knows 1-"
            f"{MAX_BINARY_VERSION}; a first word this large usually means it is not a "
            "CTranslate2 model.bin)"
        )
    spec, revision = "", 1
    if version >= 2:
        spec = cur.string("the model spec name")
        revision = cur.unpack("I", "the spec revision")
    count = cur.unpack("I", "the variable count")
    variables: dict[str, np.ndarray] = {}
    stored: dict[str, str] = {}
    for i in range(count):
        name = cur.string(f"the name of variable {i}")
        rank = cur.unpack("B", f"the rank of {name}")
        if rank > MAX_RANK:
            raise CT2FormatError(f"{source}: {name} claims rank {rank} (corrupt file?)")
        dims = tuple(cur.unpack("I", f"dimension {d} of {name}") for d in range(rank))
        if version >= 4:
            type_id = cur.unpack("B", f"the dtype of {name}")
            if type_id not in DTYPES:
                raise CT2FormatError(f"{source}: {name} has unknown dtype id {type_id} "
                                     f"(known: {DTYPES})")  # fmt: skip
            dtype = DTYPES[type_id]
            n_bytes = cur.unpack("I", f"the byte count of {name}")
        else:
            item = cur.unpack("B", f"the item size of {name}")
            if item not in _LEGACY_ITEM_SIZES:
                raise CT2FormatError(f"{source}: {name} has unknown item size {item}")
            dtype = _LEGACY_ITEM_SIZES[item]
            n_bytes = cur.unpack("I", f"the element count of {name}") * item
        np_dtype = np.dtype(_NUMPY[dtype])
        expected = int(np.prod(dims, dtype=np.int64)) * np_dtype.itemsize
        if n_bytes != expected:
            raise CT2FormatError(f"{source}: {name} has shape {dims} of {dtype} ({expected:,} "
                                 f"bytes) but stores {n_bytes:,} bytes")  # fmt: skip
        raw = cur.take(n_bytes, f"the data of {name} {dims} {dtype}")
        array = np.frombuffer(raw, dtype=np_dtype.newbyteorder("<")).reshape(dims)
        if dtype == "bfloat16":  # the high half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        if name in variables:
            raise CT2FormatError(f"{source}: variable {name!r} appears twice")
        variables[name] = array
        stored[name] = dtype
    aliases: dict[str, str] = {}
    if version >= 3:
        n_alias = cur.unpack("I", "the alias count")
        for i in range(n_alias):
            alias = cur.string(f"alias {i}")
            target = cur.string(f"the target of alias {alias!r}")
            if target not in variables:
                raise CT2FormatError(f"{source}: alias {alias!r} points to unknown {target!r}")
            aliases[alias] = target
    if cur.pos != len(cur.data):
        raise CT2FormatError(f"{source}: {len(cur.data) - cur.pos:,} unexpected bytes after the "
                             f"last record (offset {cur.pos:,})")  # fmt: skip
    return CT2Model(version, spec, revision, variables, aliases, stored)


def write_ct2_model(
    path: str | Path,
    variables: dict[str, np.ndarray],
    aliases: dict[str, str] | None = None,
    spec: str = "ModelSpec",
    revision: int = 1,
    dtypes: dict[str, str] | None = None,
) -> Path:
    """Write a version-6 ``model.bin`` (for tests and tools). ``dtypes`` can name "bfloat16" for a
    float32 array, which is then stored as its top 16 bits."""
    out = bytearray()

    def string(s: str) -> None:
        raw = s.encode("utf-8") + b"\x00"
        out.extend(struct.pack("<H", len(raw)) + raw)

    out.extend(struct.pack("<I", MAX_BINARY_VERSION))
    string(spec)
    out.extend(struct.pack("<II", revision, len(variables)))
    for name, array in variables.items():
        dtype = (dtypes or {}).get(name) or np.asarray(array).dtype.name
        array = np.asarray(array)
        if dtype == "bfloat16":
            raw = (np.ascontiguousarray(array, np.float32).view(np.uint32) >> 16).astype("<u2")
        elif dtype in _DTYPE_IDS:
            raw = np.ascontiguousarray(array, dtype=np.dtype(_NUMPY[dtype]).newbyteorder("<"))
        else:
            raise ValueError(f"{name}: CTranslate2 cannot store {dtype}")
        string(name)
        out.extend(struct.pack("<B", array.ndim))
        out.extend(struct.pack(f"<{array.ndim}I", *array.shape))
        out.extend(struct.pack("<BI", _DTYPE_IDS[dtype], raw.nbytes))
        out.extend(raw.tobytes())
    out.extend(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        string(alias)
        string(target)
    return atomic_write_bytes(path, bytes(out))
