"""Shared by the serving tests: a tiny trained bundle and a real `modalforge serve` process."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from modalforge.models import EncoderSpec
from modalforge.predictor import FitConfig, MultimodalPredictor
from modalforge.schema import Schema
from modalforge.train.module import OptimConfig

from .conftest import write_toy_manifest

TINY = {
    "image": EncoderSpec("cnn", {"widths": (8, 16), "image_size": 30}),
    "text": EncoderSpec("bag_of_embeddings", {"embed_dim": 16}),
    "audio": EncoderSpec("audio_cnn", {"n_mels": 32, "channels": (8, 16), "output_dim": 16}),
}


def train_toy_bundle(root: Path, inputs=("image", "text", "audio"), fusion="attention") -> Path:
    """A tiny classifier of 3 colours (image colour, words, tone pitch agree), every input
    optional; modality dropout teaches it to predict from any one input. -> root/"toy"."""
    manifest = write_toy_manifest(root, inputs)
    schema = Schema.from_specs([*(f"{m}={m}?" for m in inputs), "label=label"])
    optim = OptimConfig(lr=1e-2, modality_dropout=0.4)
    p = MultimodalPredictor(label="label", fusion=fusion, encoders={m: TINY[m] for m in inputs},
                            hidden=32, schema=schema, cache_dir=root / "cache",
                            fit_config=FitConfig(epochs=8, batch_size=16, patience=20, optim=optim))  # fmt: skip
    p.fit(manifest, out_dir=root / "run", progress=False)
    p.save(root / "toy", metrics={"val_accuracy": p.history["best_score"]})
    return root / "toy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, *args: str, timeout: float = 90) -> tuple[str, subprocess.Popen]:
    """`python -m modalforge.cli serve BUNDLE ARGS` on a free 127.0.0.1 port, once /readyz is 200."""
    port = free_port()
    env = {**os.environ, "MODALFORGE_CACHE": str(bundle.parent / "mfcache")}
    env.pop("MODALFORGE_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "modalforge.cli", "serve", str(bundle), "--port", str(port),
         "--log-level", "warning", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return url, proc
        if proc.poll() is not None:
            raise RuntimeError("the server exited:\n" + proc.stdout.read().decode())
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"the server did not become ready within {timeout:g} s")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_server(bundle: Path, *args: str):
    url, proc = start_server(bundle, *args)
    try:
        yield url, proc
    finally:
        stop_server(proc)
