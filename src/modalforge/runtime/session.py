"""The one place ONNX Runtime sessions are made, and the torch-thread guard that runs beside them.

Execution providers: TensorRT, then CUDA, when the installed onnxruntime offers them and
``device`` is CUDA, then the CPU -- ``onnxruntime.get_available_providers()`` decides, nothing
else. Worker threads do not spin between runs (see ``session``).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def providers(device: str | None = None) -> list[str]:
    """The execution providers for ``device`` (default: CUDA when torch sees one), best first."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if (device or default_device()).startswith("cuda"):
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", *wanted]
    return [p for p in wanted if p in available] or available


def session(path: str | Path, device: str | None = None, threads: int = 0, spinning: bool = False):
    """An ``onnxruntime.InferenceSession`` for the graph at ``path``: all graph optimizations,
    ``threads`` intra-op threads (0: ONNX Runtime's choice), errors-only logging.

    ``spinning`` off by default: ORT's workers spin between runs otherwise, and beside torch's
    OpenMP threads (collation, Whisper's log-mel) on a small CPU that made batch-1 requests ~6x
    slower (measured: 86 vs 14 ms per demo sample)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=providers(device))


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 1


@contextlib.contextmanager
def single_torch_thread():
    """torch on one intra-op thread inside: for the Python-side ``prepare`` (Whisper's log-mel
    is a dozen small torch ops) that runs right before an ONNX Runtime call. With torch's two
    OpenMP threads, the idle one spin-waits after each parallel region and holds the core that
    ORT's worker then needs: on the 2-core demo machine Whisper's graph ran at 6.0 ms per
    request instead of 4.5 ms (and the log-mel, beside any other busy process, took 90 ms
    instead of 1 ms). Process-wide (torch has no per-thread setting), so nested / concurrent
    users share it and the last one out restores the previous count."""
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            if _threads_saved != 1:
                torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0 and _threads_saved != 1:
                torch.set_num_threads(_threads_saved)


__all__ = ["default_device", "providers", "session", "single_torch_thread"]
