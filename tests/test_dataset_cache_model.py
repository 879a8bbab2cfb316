"""Featurizers, the feature cache and the assembled model, with tiny encoders."""

import numpy as np
import torch

from modalforge.data.cache import FeatureCache
from modalforge.data.dataset import Augment, Featurizer, MultimodalDataset, collate
from modalforge.data.manifest import read_manifest
from modalforge.data.text import WordVocab
from modalforge.encoders import create_encoder
from modalforge.models import EncoderSpec, ModelConfig, build_model
from modalforge.schema import Modality


def featurizers(vocab):
    return {
        "image": Featurizer(Modality.IMAGE, {"size": 30, "normalization": "unit"}),
        "text": Featurizer(
            Modality.TEXT, {"tokenizer": "word_vocab", "max_length": 8}, vocab=vocab
        ),
        "audio": Featurizer(Modality.AUDIO, {"sample_rate": 16_000, "max_seconds": 0.5}),
    }


def test_dataset_collates_with_missing_values(mixed_manifest):
    m = read_manifest(mixed_manifest)
    m.frame.loc[1, "image"] = None
    m.frame.loc[2, "text"] = None
    vocab = WordVocab.build(m.frame["text"].dropna())
    feats = featurizers(vocab)
    ds = MultimodalDataset(m, feats, targets=[0, 1, 0, 1, 0, 1])
    batch = collate([ds[i] for i in range(4)], feats)
    assert batch["inputs"]["image"]["pixels"].shape == (4, 3, 30, 30)
    assert batch["inputs"]["text"]["input_ids"].shape == (4, 8)
    assert batch["inputs"]["audio"]["waves"].shape[0] == 4
    assert batch["mask"]["image"].tolist() == [True, False, True, True]
    assert batch["mask"]["text"].tolist() == [True, True, False, True]
    assert batch["y"].tolist() == [0, 1, 0, 1]
    assert batch["inputs"]["image"]["pixels"][1].abs().sum() == 0  # placeholder


def test_augmentation_only_in_training(mixed_manifest):
    m = read_manifest(mixed_manifest)
    aug = Augment(
        image_flip=True, image_crop=0.3, image_jitter=0.3, audio_noise=0.5, audio_gain_db=6
    )
    feat = Featurizer(Modality.IMAGE, {"size": 30, "normalization": "unit"}, augment=aug)
    clean = feat.load("img/3.png", m.root, train=False)
    assert torch.equal(clean, feat.load("img/3.png", m.root, train=False))
    snd = Featurizer(Modality.AUDIO, {"max_seconds": 1.0}, augment=aug)
    a = snd.load("aud/0.wav", m.root, train=False)
    import random

    b = snd.load("aud/0.wav", m.root, train=True, rng=random.Random(1))
    assert a.shape == b.shape and not np.allclose(a, b)


def test_feature_cache_hits_and_invalidates(tmp_path, mixed_manifest):
    m = read_manifest(mixed_manifest)
    torch.manual_seed(0)
    enc = create_encoder("cnn", widths=(8, 16), image_size=30).freeze()
    feat = Featurizer(Modality.IMAGE, enc.preprocessing)
    calls = []

    def encode(values):
        calls.append(len(values))
        return enc(feat.collate([feat.load(v, m.root) for v in values])).pooled

    cache = FeatureCache(tmp_path / "cache")
    values = [*m.frame["image"].tolist(), None]
    first, present = cache.features(enc, Modality.IMAGE, values, m.root, encode, progress=False)
    assert first.shape == (7, enc.output_dim) and present.tolist() == [True] * 6 + [False]
    assert sum(calls) == 6 and first[6].abs().sum() == 0
    again, _ = cache.features(enc, Modality.IMAGE, values, m.root, encode, progress=False)
    assert sum(calls) == 6 and torch.equal(first, again)  # all hits
    (m.root / "img" / "0.png").write_bytes((m.root / "img" / "5.png").read_bytes())
    cache.features(enc, Modality.IMAGE, values, m.root, encode, progress=False)
    assert sum(calls) == 6  # 0.png now has 5.png's bytes: same content key, still a hit
    from .conftest import png_bytes

    (m.root / "img" / "0.png").write_bytes(png_bytes(color=(1, 2, 3)))
    cache.features(enc, Modality.IMAGE, values, m.root, encode, progress=False)
    assert sum(calls) == 7  # changed content: re-encoded
    other = create_encoder("cnn", widths=(8, 16), image_size=30, seed=1).freeze()  # other weights
    cache.features(other, Modality.IMAGE, values, m.root, encode, progress=False)
    assert sum(calls) == 13  # new namespace: everything re-encoded


def test_feature_cache_filled_at_once_by_two_writers_encodes_each_item_once(
    tmp_path, mixed_manifest
):
    """Two writers (DDP ranks, two runs on one MODALFORGE_CACHE) miss the same rows at the same
    moment: one encodes while the other waits on the namespace's lock and then reads its rows.
    Each writer opens its own lock file handle, so threads contend exactly as processes do."""
    import threading
    import time

    m = read_manifest(mixed_manifest)
    torch.manual_seed(0)
    enc = create_encoder("cnn", widths=(8, 16), image_size=30).freeze()
    feat = Featurizer(Modality.IMAGE, enc.preprocessing)
    encoded, results, start = [], {}, threading.Barrier(2)

    def encode(values):
        encoded.extend(values)
        time.sleep(0.3)  # long enough for the other writer to miss too
        return enc(feat.collate([feat.load(v, m.root) for v in values])).pooled

    def writer(name):
        cache = FeatureCache(tmp_path / "cache")
        start.wait()
        results[name] = cache.features(enc, Modality.IMAGE, m.frame["image"].tolist(), m.root,
                                       encode, progress=False)[0]  # fmt: skip
        results[name + ".stats"] = next(iter(cache.stats.values()))

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(encoded) == sorted(m.frame["image"].tolist())  # 6 rows, each encoded once
    assert torch.equal(results["a"], results["b"])
    stats = sorted((results["a.stats"].misses, results["b.stats"].misses))
    assert stats == [0, 6]  # the waiting writer found every row


def test_model_from_config_with_cached_features_and_masks():
    config = ModelConfig(
        task="classification",
        inputs={"image": EncoderSpec("cnn", {"widths": (8, 16), "image_size": 30}, train="frozen"),
                "text": EncoderSpec("bag_of_embeddings", {"vocab_size": 20, "embed_dim": 8}, train="full")},
        num_outputs=3, fusion="attention", hidden=16,
    )  # fmt: skip
    model = build_model(config)
    assert all(not p.requires_grad for p in model.encoder("image").parameters())
    assert all(p.requires_grad for p in model.encoder("text").parameters())
    inputs = {
        "text": {
            "input_ids": torch.randint(4, 20, (2, 5)),
            "attention_mask": torch.ones(2, 5, dtype=torch.long),
        }
    }
    features = {"image": torch.randn(2, model.encoder("image").output_dim)}
    mask = {"image": torch.tensor([True, False]), "text": torch.tensor([True, True])}
    out = model(inputs, mask, features=features)
    assert out.outputs.shape == (2, 3) and out.weights.shape == (2, 2)
    assert out.weights[1, 0] == 0  # the missing image gets no attention
    assert ModelConfig.from_dict(config.to_dict()) == config
    late = build_model(
        ModelConfig(task="classification", inputs=config.inputs, num_outputs=3, fusion="late")
    )
    assert isinstance(late.head, torch.nn.Identity)
