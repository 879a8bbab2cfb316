"""Pruned and distilled variants: trained a little more, gated, added, loaded, served."""

import json

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from modalforge.bundle import load_bundle
from modalforge.cli import app as cli
from modalforge.data.manifest import read_manifest
from modalforge.export import ParityGateError
from modalforge.export.compress import distill_bundle, prune_bundle
from modalforge.export.parity import Gate
from modalforge.predictor import MultimodalPredictor
from modalforge.serve.app import ServeConfig, create_app
from modalforge.serve.engine import Engine
from modalforge.train.module import MultimodalModule, OptimConfig

from .conftest import COLORS, png_bytes
from .serving import train_toy_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return train_toy_bundle(tmp_path_factory.mktemp("compress"))


@pytest.fixture(scope="module")
def rows(bundle):
    return read_manifest(bundle.parent / "manifest.csv")


def _sparsity(tensor: torch.Tensor) -> float:
    return float((tensor == 0).float().mean())


def _red_answer(engine: Engine) -> dict:
    with TestClient(create_app(engine, ServeConfig())) as c:
        r = c.post("/v1/predict", files={"image": ("r.png", png_bytes((30, 30), COLORS["r"]),
                                                   "image/png")})  # fmt: skip
        assert r.status_code == 200, r.text
        assert c.get("/v1/models").json()["data"][0]["variant"] == engine.variant
        return r.json()


@pytest.fixture(scope="module")
def pruned(bundle, rows):
    info = prune_bundle(bundle, rows, rows, amount=0.5, epochs=2)
    return bundle, info


def test_pruning_keeps_its_zeros_through_the_fine_tune(pruned):
    bundle, info = pruned
    variant = load_bundle(bundle).variants["pruned"]  # verifies the hashes of the new file
    assert variant["format"] == "safetensors" and variant["parity"]["passed"]
    assert variant["finetune"]["epochs"] >= 1
    for part in ("encoder:image", "encoder:text", "encoder:audio", "fusion", "head"):
        assert info["sparsity"][part]["sparsity"] == pytest.approx(0.5, abs=0.01), part
    original = MultimodalPredictor.load(bundle).model.state_dict()
    weights = MultimodalPredictor.load(bundle, variant="pruned").model.state_dict()
    changed = [k for k in weights if not torch.equal(weights[k], original[k])]
    assert changed, "the variant's weights are the original ones"
    # the fine-tune trained the rest; the pruned half stayed zero (not regrown by AdamW)
    matrices = [k for k in changed if k.endswith("weight") and weights[k].dim() >= 2]
    assert matrices
    zeros = sum(int((weights[k] == 0).sum()) for k in matrices)
    assert zeros / sum(weights[k].numel() for k in matrices) > 0.45


def test_a_pruned_variant_gets_encoder_ids_of_its_own(pruned):
    bundle, _ = pruned
    base = MultimodalPredictor.load(bundle).model
    variant = MultimodalPredictor.load(bundle, variant="pruned").model
    for column in base.columns:  # else the feature cache would hand out the old features
        assert base.encoder(column).encoder_id != variant.encoder(column).encoder_id


def test_the_server_answers_from_the_pruned_variant(pruned):
    bundle, _ = pruned
    engine = Engine.from_bundle(bundle, device="cpu", variant="pruned")
    answer = _red_answer(engine)
    assert answer["label"] == "r" and engine.version != Engine.from_bundle(bundle).version


def test_structured_pruning_zeroes_whole_channels_and_spares_the_classifier(bundle, rows):
    info = prune_bundle(bundle, rows, rows, amount=0.25, structured=True, epochs=0,
                        name="pruned-s", rule=Gate(max_f1_drop=1.0))  # fmt: skip
    assert "head" not in info["sparsity"]
    weights = MultimodalPredictor.load(bundle, variant="pruned-s").model.state_dict()
    original = MultimodalPredictor.load(bundle).model.state_dict()
    assert torch.equal(weights["head.1.weight"], original["head.1.weight"])
    rows_zeroed = 0
    for key, w in weights.items():
        if key.startswith("encoders.") and key.endswith("weight") and w.dim() >= 2:
            rows_zeroed += int((w.reshape(w.shape[0], -1) == 0).all(1).sum())
    assert rows_zeroed > 0


def test_over_pruning_fails_the_gate_and_adds_nothing(bundle, rows):
    with pytest.raises(ParityGateError, match="macro-F1 drops") as err:
        prune_bundle(bundle, rows, rows, amount=0.99, epochs=0, name="ruined")
    assert err.value.result["f1_macro_drop"] > 0.01
    assert "ruined" not in load_bundle(bundle).variants


def test_distillation_loss_is_hinton_kd_plus_hard_labels():
    optim = OptimConfig(distill_alpha=0.7, distill_temperature=3.0)
    module = MultimodalModule(torch.nn.Linear(1, 1), True, optim)  # loss only
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    p_t = (teacher / 3).softmax(-1)
    kl = (p_t * (p_t.log() - (student / 3).log_softmax(-1))).sum(-1).mean()
    want = 0.7 * 9 * kl + 0.3 * torch.nn.functional.cross_entropy(student, y)
    assert module.loss(student, y, teacher).item() == pytest.approx(want.item(), rel=1e-5)
    assert module.loss(student, y).item() == pytest.approx(
        torch.nn.functional.cross_entropy(student, y).item(), rel=1e-6
    )
    # all soft (alpha 1): the teacher's own logits are the minimum, up to a constant per row
    module.optim = OptimConfig(distill_alpha=1.0)
    assert module.loss(teacher + 5.0, y, teacher).item() == pytest.approx(0.0, abs=1e-6)


STUDENT = """
fusion: concat
hidden: 16
fusion_kwargs: {hidden: 16}
encoders: {image: cnn, text: bag_of_embeddings, audio: audio_cnn}
encoder_kwargs:
  image: {widths: [4, 8], image_size: 30}
  text: {embed_dim: 8}
  audio: {n_mels: 32, channels: [4, 8], output_dim: 8}
schema: {image: "image?", text: "text?", audio: "audio?"}
epochs: 8
batch_size: 16
lr: 0.01
modality_dropout: 0.4
"""


def test_distilled_student_is_added_gated_and_served(bundle, rows, tmp_path):
    config = tmp_path / "student.yaml"
    config.write_text(STUDENT)
    info = distill_bundle(bundle, config, rows, rows, temperature=2.0, alpha=0.5)
    assert info["params"]["student"] < info["params"]["teacher"] / 2
    assert info["parity"]["passed"] and info["parity"]["variant_accuracy"] > 0.9
    loaded = load_bundle(bundle)  # the student's files are the variant's, hashes checked
    assert loaded.variants["distilled"]["format"] == "bundle"
    assert load_bundle(bundle / "distilled").labels == loaded.labels
    engine = Engine.from_bundle(bundle, device="cpu", variant="distilled")
    assert engine.name == Engine.from_bundle(bundle).name
    assert _red_answer(engine)["label"] == "r"


def test_cli_export_prune_and_refusals(bundle):
    manifest = str(bundle.parent / "manifest.csv")
    result = CliRunner().invoke(cli, ["export", str(bundle), "--manifest", manifest, "--split",
                                      "", "--prune", "0.3", "--finetune-epochs", "1",
                                      "--name", "p30"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "sparsity" in result.output
    variants = json.loads((bundle / "modalforge.json").read_text())["variants"]
    assert variants["p30"]["pruning"]["amount"] == 0.3
    both = CliRunner().invoke(cli, ["export", str(bundle), "--manifest", manifest, "--split", "",
                                    "--prune", "0.3", "--quantize", "int8"])  # fmt: skip
    assert both.exit_code == 1 and "one kind of variant" in both.output
    bad = CliRunner().invoke(cli, ["export", str(bundle), "--manifest", manifest, "--split", "",
                                   "--prune", "1.5"])  # fmt: skip
    assert bad.exit_code == 1 and "between 0 and 1" in bad.output
