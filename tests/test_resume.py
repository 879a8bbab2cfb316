"""Killing training with SIGKILL and re-running with --resume continues from the last checkpoint."""

import os
import signal
import subprocess
import sys
import time

import torch
import yaml

from .test_predictor import toy  # noqa: F401  (fixture)

CONFIG = {
    "label": "label",
    "encoders": {"image": "cnn", "text": "bag_of_embeddings"},
    "encoder_kwargs": {"image": {"widths": [8, 16], "image_size": 30}, "text": {"embed_dim": 16}},
    "columns": ["image", "text"],
    "hidden": 16,
    "epochs": 12,
    "batch_size": 8,
    "patience": 100,
    "save_bundle": False,
}


def test_sigkill_then_resume_continues_from_last_checkpoint(toy, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "manifest": str(toy), "out": str(run)}))
    env = {**os.environ, "MODALFORGE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "modalforge.cli", "train", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if last.is_file() and proc.poll() is None:
                epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
                if epoch >= 2:
                    break
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    assert 2 <= killed_at < CONFIG["epochs"]
    assert not (run / "history.json").exists()  # the killed run never finished
    subprocess.run([*cmd, "--resume"], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=300)  # fmt: skip
    import json

    history = json.loads((run / "history.json").read_text())
    assert history["resumed_from_epoch"] == killed_at
    # every remaining epoch ran: the last checkpoint is the final epoch's (0-based)
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == CONFIG["epochs"] - 1
    assert history["epochs_run"] == CONFIG["epochs"]
