"""Shared by the serving tests: a tiny trained bundle and a real `modalforge serve` process."""

import contextlib
import math
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


def hostile_mix(client, good: list[dict], hostile: list[dict], answer=None):
    """Send each of ``good`` alone, then every request of ``good`` and ``hostile`` at once (one
    thread each, so they meet in the server's batches); assert that each good request gets 200
    and the answer it got alone, and each hostile one a 4xx with a message. Requests are
    ``client.post`` kwargs with the route as ``url``; ``answer(response)`` picks what must not
    change (default: the JSON body), compared by ``same_answer``. -> (the hostile responses,
    ``(items, failures)`` of each batch the micro-batcher ran meanwhile)."""
    import concurrent.futures

    answer = answer or (lambda r: r.json())
    alone = []
    for request in good:
        r = client.post(**request)
        assert r.status_code == 200, r.text
        alone.append(answer(r))
    batcher = client.app.state.batcher
    fn, batches = batcher.fn, []

    def recording(items):
        out = fn(items)
        batches.append((len(items), sum(isinstance(o, BaseException) for o in out)))
        return out

    half = len(good) // 2
    order = [*good[:half], *hostile, *good[half:]]
    batcher.fn = recording
    try:
        with concurrent.futures.ThreadPoolExecutor(len(order)) as pool:
            responses = list(pool.map(lambda r: client.post(**r), order))
    finally:
        batcher.fn = fn
    got = dict(zip(map(id, order), responses, strict=True))
    for request, expected in zip(good, alone, strict=True):
        r = got[id(request)]
        assert r.status_code == 200, r.text
        same_answer(answer(r), expected)
    bad = [got[id(request)] for request in hostile]
    for r in bad:
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]["message"]
    return bad, batches


def same_answer(got, expected, where: str = "answer") -> None:
    """``got`` equals ``expected``: labels, texts, token ids and every other non-float exactly;
    floats to 1e-5. A float32 matrix product over a batch of 16 is not bit-equal to the same
    row's product alone (the kernels block the rows differently): the last bits may differ."""
    if isinstance(expected, float) and isinstance(got, float):
        assert math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-5), (where, got, expected)
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), (where, got, expected)
        for k in expected:
            same_answer(got[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), (where, got, expected)
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            same_answer(g, e, f"{where}[{i}]")
    else:
        assert got == expected, (where, got, expected)
