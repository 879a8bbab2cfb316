"""The chat task end to end on a tiny random Gemma-3 and tiny from-scratch towers: the chat
format, training (both stages), the bundle (no LLM weights inside, the LLM checked by sha256),
and answers through the engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from modalforge import tasks
from modalforge.llm.loader import load_llm
from modalforge.llm.types import SamplingParams
from modalforge.tasks.chat.data import Conversation, Turn, write_conversations
from modalforge.tasks.chat.format import IGNORE, ChatFormat
from modalforge.tasks.chat.predictor import ChatFitConfig, ChatPredictor
from tests.tiny_llm import tiny_gemma, tiny_tokenizer

COLORS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230)}
TOWERS = dict(image_encoder="cnn", image_kwargs={"image_size": 32}, audio_encoder="audio_cnn",
              image_tokens=4, audio_tokens=2)  # fmt: skip


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """The tiny LLM as a transformers folder, as a user's --llm PATH would be."""
    folder = tmp_path_factory.mktemp("llm")
    tiny_gemma(seed=0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("chatdata"))


def write_chat_data(root: Path) -> Path:
    """60 conversations (21/6/3 per kind in train/val/test): a coloured square's name, a
    tone's "name"."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, rgb) in enumerate(COLORS.items()):
        Image.new("RGB", (32, 32), rgb).save(root / f"{name}.png")
        wave = 0.3 * np.sin(np.arange(8000) * (i + 1) * 0.07).astype("float32")
        sf.write(root / f"{name}.wav", wave, 16000)
    convs = []
    for k in range(30):
        name = list(COLORS)[k % 3]
        split = "train" if k < 21 else ("val" if k < 27 else "test")
        convs.append(Conversation(f"i{k}", root / f"{name}.png", None,
                                  [Turn("user", "<image>\nwhat is this?"),
                                   Turn("assistant", name)], split, "caption"))  # fmt: skip
        convs.append(Conversation(f"a{k}", None, root / f"{name}.wav",
                                  [Turn("user", "<audio>\nwhat is said?"),
                                   Turn("assistant", name)], split, "speech"))  # fmt: skip
    path = write_conversations(root / "chat.jsonl", convs)
    return path


def _predictor(llm_dir, tmp_path, **fit):
    fit = ChatFitConfig(batch_size=6, precision="32-true", stage1_lr=3e-3, stage2_lr=3e-3,
                        lora={"r": 4, "alpha": 8}, **fit)  # fmt: skip
    return ChatPredictor(str(llm_dir), fit=fit, cache_dir=tmp_path / "cache", **TOWERS)


def test_format_marks_answers_and_keeps_typed_control_tokens_as_text():
    fmt = ChatFormat(tiny_tokenizer(), image_tokens=3, audio_tokens=2)
    turns = [Turn("system", "be brief"), Turn("user", "<image>\nwhat? <unused0><start_of_turn>"),
             Turn("assistant", "a dog"), Turn("user", "<audio> and?")]  # fmt: skip
    enc = fmt.encode(turns, add_generation_prompt=True)
    assert enc.ids.count(fmt.image_id) == 3 and enc.ids.count(fmt.audio_id) == 2  # typed one: text
    assert enc.ids.count(fmt.start_id) == 4  # the typed <start_of_turn> is plain text too
    assert [k for k, _ in enc.spans] == ["image", "audio"]
    assert all(enc.ids[s] == fmt.image_id for k, s in enc.spans if k == "image")
    answer = [i for i, label in zip(enc.ids, enc.labels, strict=True) if label != IGNORE]
    assert fmt.tokenizer.decode(answer) == "a dog<end_of_turn>"
    assert fmt.tokenizer.decode(enc.ids).endswith("<start_of_turn>model\n")


def test_training_lowers_the_answer_loss_in_both_stages(llm_dir, chat_data, tmp_path):
    chat = _predictor(llm_dir, tmp_path, stage1_epochs=3, stage2_epochs=3)
    chat.fit(chat_data, out_dir=tmp_path / "run", progress=False)
    stages = chat.history["stages"]
    assert [s["stage"] for s in stages] == [1, 2]
    first = _val_loss(tmp_path / "run" / "stage1")
    assert first[-1] < first[0]  # the projectors learn
    assert stages[1]["best_score"] < stages[0]["best_score"]  # LoRA lowers it further
    assert chat.config.lora is not None and chat.test_manifest
    # a checkpoint holds the trained parameters only, never the frozen LLM
    ckpt = torch.load(tmp_path / "run/stage2/checkpoints/last.ckpt", weights_only=False)
    names = set(ckpt["state_dict"])
    assert names and all("lora_" in n or "_proj." in n for n in names)


def _val_loss(run):
    import csv

    with open(run / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [float(r["val_loss"]) for r in rows if r.get("val_loss")]


def test_bundle_round_trip_answers_the_same(llm_dir, chat_data, tmp_path):
    chat = _predictor(llm_dir, tmp_path, stage1_epochs=1, stage2_epochs=1)
    chat.fit(chat_data, out_dir=tmp_path / "run", progress=False)
    image = chat_data.parent / "red.png"
    params = SamplingParams(max_tokens=6, temperature=0.0)
    before = chat.reply([Turn("user", "what is this?")], image=image, params=params)
    bundle = chat.save(tmp_path / "bundle")
    assert bundle.task == "chat"
    assert bundle.model_config["llm"]["sha256"] == chat.ref.sha256
    size = sum(p.stat().st_size for p in bundle.path.rglob("*") if p.is_file())
    assert size < sum(p.stat().st_size for p in llm_dir.glob("*.safetensors"))  # no LLM inside
    again = tasks.load(bundle.path)
    assert isinstance(again, ChatPredictor) and again.config.lora == chat.config.lora
    assert again.reply([Turn("user", "what is this?")], image=image, params=params) == before
    assert tasks.for_bundle(bundle).can("llm")
    # decoding from a copy leaves the adapters; the copy shares the untouched token table
    copy = again.model.merged_llm()
    table = again.model.base_llm().get_input_embeddings().weight
    assert copy.get_input_embeddings().weight is table and again.model.adapted
    # a server merges in place (no second copy): same answer, and the adapters are gone
    again.engine(inplace=True)
    assert again.reply([Turn("user", "what is this?")], image=image, params=params) == before
    assert not again.model.adapted
    with pytest.raises(RuntimeError, match="merged"):
        again.model.trained_state()


def test_a_bundle_refuses_a_different_llm(llm_dir, chat_data, tmp_path):
    chat = _predictor(llm_dir, tmp_path, stage1_epochs=1, stage2_epochs=0)
    chat.fit(chat_data, out_dir=tmp_path / "run", progress=False)
    bundle = chat.save(tmp_path / "bundle")
    other = tmp_path / "other-llm"
    tiny_gemma(seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    with pytest.raises(ValueError, match="sha256"):
        ChatPredictor.from_bundle(bundle, llm=str(other))


def test_media_without_a_mark_goes_first_and_a_mark_without_media_is_refused(llm_dir, tmp_path,
                                                                             chat_data):  # fmt: skip
    chat = _predictor(llm_dir, tmp_path)
    prompt = chat.prompt([Turn("user", "what is this?")], image=chat_data.parent / "red.png")
    assert len(prompt.spans) == 1 and prompt.spans[0].embeds.shape == (4, 32)
    assert prompt.token_ids[prompt.spans[0].start] == chat.format.image_id
    with pytest.raises(ValueError, match="no audio"):
        chat.prompt([Turn("user", "<audio> what is said?")])


def _in_mapped_file(model, folder) -> list[str]:
    """The parameters whose data lie in a memory map of a file in ``folder`` (Linux)."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith(str(folder)):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return [n for n, p in model.named_parameters()
            if any(a <= p.data_ptr() < b for a, b in spans)]  # fmt: skip


def test_load_llm_reads_a_folder_and_records_its_digest(llm_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    mapped = AutoModelForCausalLM.from_pretrained(llm_dir)
    assert _in_mapped_file(mapped, llm_dir)  # what transformers alone gives: views of the file
    model, tokenizer, ref = load_llm(str(llm_dir))
    assert ref.source == str(llm_dir) and len(ref.sha256) == 64
    assert model.config.hidden_size == 32 and tokenizer.convert_tokens_to_ids("<end_of_turn>") == 5
    # the weights in the process's own memory (a quantizing server frees them), and the same
    assert not _in_mapped_file(model, llm_dir)
    state = model.state_dict()
    for name, tensor in load_file(llm_dir / "model.safetensors").items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)


def test_evaluation_scores_every_question_type_and_writes_a_report(llm_dir, chat_data, tmp_path):
    chat = _predictor(llm_dir, tmp_path, stage1_epochs=1, stage2_epochs=1)
    chat.fit(chat_data, out_dir=tmp_path / "run", progress=False)
    result = chat.evaluate(chat_data, out_dir=tmp_path / "report", progress=False)
    assert result["rows"] == 6  # the test split: 3 caption + 3 speech conversations
    assert set(result["scores"]) == {"caption", "speech"}
    assert result["scores"]["caption"]["cider_d"] >= 0.0 and result["scores"]["speech"]["n"] == 3
    ppl = result["perplexity"]
    assert (
        ppl["before_lora"] > 1 and ppl["after_lora"] > 1 and ppl["before_lora"] != ppl["after_lora"]
    )
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| caption | 3 |" in report and "Perplexity" in report
    lines = (tmp_path / "report" / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_caption_scoring_is_the_captioners():
    from modalforge.tasks.chat.evaluation import caption_scores, normalize

    same = caption_scores(["a red apple", "grinning face"], ["red apple", "grinning face"])
    assert same["exact"] == 0.5 and same["cider_d"] > 0
    perfect = caption_scores(["red apple", "grinning face"], ["Red Apple", "grinning face"])
    assert perfect["exact"] == 1.0 and perfect["bleu1"] == 1.0
    assert normalize(" Smileys & Emotion. ") == "smileys emotion"


def test_request_media_are_encoded_once_per_content(llm_dir, chat_data, tmp_path):
    chat = _predictor(llm_dir, tmp_path)
    red = (chat_data.parent / "red.png").read_bytes()
    blue = (chat_data.parent / "blue.png").read_bytes()
    first = chat.tower_tokens("image", red)
    assert chat.tower_tokens("image", bytes(red)) is first  # same bytes: the cached tokens
    other = chat.tower_tokens("image", blue)
    assert other is not first and not torch.equal(other, first)
    fresh = chat.tower("image").encode([chat.tower("image").load(red)])[0]
    assert torch.allclose(first, fresh)
