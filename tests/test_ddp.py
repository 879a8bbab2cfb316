"""Distributed training with Lightning DDP: two CPU processes (gloo) through the real CLI.

Lightning's DDP launcher re-runs the command in a second process; both train on their shard of
the rows, and only rank 0 evaluates, writes the report and writes the bundle."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pandas as pd
import yaml

from modalforge import tasks

from .conftest import write_toy_manifest


def train_on_two_processes(config, env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    """``modalforge train --config CONFIG`` on 2 gloo processes -> (exit code, its output). On
    a timeout the whole process group is killed: a hung rank ignores SIGTERM (Lightning waits
    in its collective), and Lightning's launcher started the other rank as a child."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "modalforge.cli", "train", "--config", str(config),
         "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"DDP training hung for {timeout} s:\n{out[-3000:]}") from None
    return proc.returncode, out


def test_two_processes_train_one_bundle_whose_metrics_equal_a_single_process_evaluation(
    tmp_path,
):
    manifest = write_toy_manifest(tmp_path, inputs=("image", "text"))
    frame = pd.read_csv(manifest)
    frame["split"] = ["train"] * 40 + ["val"] * 10 + ["test"] * 10
    frame.to_csv(manifest, index=False)
    config = {
        "label": "label",
        "encoders": {"image": "cnn", "text": "bag_of_embeddings"},
        "encoder_kwargs": {"image": {"widths": [8, 16], "image_size": 30},
                           "text": {"embed_dim": 16}},
        "columns": ["image", "text"],
        "finetune": {"image": "frozen"},  # its features go through the feature cache
        "fusion_out_dim": 16, "epochs": 4, "batch_size": 8, "patience": 100, "lr": 0.01,
        "manifest": str(manifest), "out": str(tmp_path / "run"),
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "MODALFORGE_CACHE": str(tmp_path / "cache")}
    code, out = train_on_two_processes(tmp_path / "config.yaml", env)
    assert code == 0, out[-3000:]
    assert out.count("rank 1 of 2: trained") == 1, out[-3000:]
    assert out.count("bundle: ") == 1 and out.count("report: ") == 1, out[-3000:]
    assert "sync_dist" not in out  # epoch metrics are reduced across the ranks
    run = tmp_path / "run"
    with (run / "logs" / "metrics.csv").open() as f:
        losses = [float(r["train_loss"]) for r in csv.DictReader(f) if r["train_loss"]]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    # the bundle's metrics are what one process measures on the same test rows
    summary = json.loads((run / "summary.json").read_text())
    bundle = tasks.load(run / "bundle")
    alone = bundle.evaluate(manifest, split="test", out_dir=tmp_path / "alone")
    assert summary["headline"]["n"] == alone["headline"]["n"] == 10
    for metric in ("accuracy", "f1_macro", "log_loss"):
        assert abs(summary["headline"][metric] - alone["headline"][metric]) < 1e-6, metric
    assert bundle.bundle.metrics["accuracy"] == summary["headline"]["accuracy"]
    leftovers = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert leftovers == ["best.ckpt", "last.ckpt"], leftovers


def test_the_chat_llm_trains_on_two_processes_and_rank_0_alone_writes(tmp_path):
    """The chat task runs its own two-stage loop: both stages on 2 gloo processes (projectors,
    then LoRA), one bundle, one history."""
    from tests.test_chat_task import TOWERS, write_chat_data
    from tests.tiny_llm import tiny_gemma, tiny_tokenizer

    llm = tmp_path / "llm"
    tiny_gemma(seed=0).save_pretrained(llm)
    tiny_tokenizer().save_pretrained(llm)
    data = write_chat_data(tmp_path / "data")
    config = {
        "task": "chat", "manifest": str(data), "out": str(tmp_path / "run"),
        "encoders": {"image": TOWERS["image_encoder"], "audio": TOWERS["audio_encoder"]},
        "encoder_kwargs": {"image": TOWERS["image_kwargs"]},
        "batch_size": 6, "precision": "32-true", "patience": 5,
        "task_options": {"llm": str(llm), "image_tokens": TOWERS["image_tokens"],
                         "audio_tokens": TOWERS["audio_tokens"], "stage1_epochs": 2,
                         "stage2_epochs": 1, "stage1_lr": 3e-3, "stage2_lr": 3e-3,
                         "lora": {"r": 4, "alpha": 8}},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "MODALFORGE_CACHE": str(tmp_path / "cache")}
    code, out = train_on_two_processes(tmp_path / "config.yaml", env)
    assert code == 0, out[-3000:]
    assert out.count("rank 1 of 2: trained") == 1 and out.count("bundle: ") == 1, out[-3000:]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [s["processes"] for s in history["stages"]] == [2, 2]
    assert tasks.load(tmp_path / "run" / "bundle").task == "chat"
