"""``ChatPredictor``: train, save, load and talk to the multimodal chat LLM.

    from modalforge.tasks.chat.predictor import ChatPredictor
    chat = ChatPredictor()                                   # Gemma-3-270M from its package
    chat.fit("data/emoji/chat.jsonl", out_dir="runs/chat")   # stage 1, then stage 2 (LoRA)
    chat.save("runs/chat/bundle")
    chat.reply([Turn("user", "<image>\\nWhat is this?")], image="apple.png")

Training data is LLaVA's conversation JSONL (``data.read_conversations``). The bundle holds the
projectors and LoRA adapters (a few MB) and a reference to the LLM with its sha256; the LLM
itself stays in the user's cache.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from modalforge.files import atomic_write_json
from modalforge.llm.loader import LlmRef, load_llm
from modalforge.llm.types import EmbedSpan, Prompt, SamplingParams
from modalforge.schema import Modality, Schema
from modalforge.tasks.base import default_cache_dir
from modalforge.tasks.chat.data import Turn
from modalforge.tasks.chat.format import AUDIO_MARK, IMAGE_MARK, ChatFormat, Encoded
from modalforge.tasks.chat.model import ChatConfig, ChatModel
from modalforge.tasks.chat.towers import Tower
from modalforge.tasks.chat.training import ChatModule, Example, Examples, collate

TASK = "chat"
#: decoded requests' tower tokens kept (sha256 of the bytes -> tokens): a few MB
MEDIA_CACHE_ITEMS = 64
SCHEMA = Schema.from_dict({"image": {"type": "image", "required": False},
                           "audio": {"type": "audio", "required": False},
                           "text": {"type": "text", "required": False}})  # fmt: skip


@dataclass
class ChatFitConfig:
    """The two stages: projectors alone, then projectors + LoRA."""

    stage1_epochs: int = 1
    stage2_epochs: int = 2
    stage1_lr: float = 1e-3
    stage2_lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    patience: int = 2
    precision: str | None = "bf16-mixed"  # None: 16-mixed on CUDA, 32 elsewhere
    lora: dict[str, Any] = field(default_factory=lambda: {"r": 16, "alpha": 32})
    # most conversations of a question type per split to train / validate on (data.cap_per_type;
    # "*": every other type), so a recipe sizes its epochs; None: all of them
    max_per_type: dict[str, int] | None = None
    seed: int = 0
    num_workers: int = 0
    # where each stage trains (Lightning's; --devices 2 --strategy ddp: two processes)
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1


class ChatPredictor:
    task = TASK
    label = None  # no label column: the answers are in the conversations

    def __init__(self, llm: str | None = None, *, image_tokens: int = 16, audio_tokens: int = 8,
                 image_encoder: str = "efficientnet_lite0",
                 image_kwargs: dict[str, Any] | None = None,
                 audio_encoder: str = "whisper_tiny_en", max_length: int = 512,
                 system: str | None = None, fit: ChatFitConfig | None = None,
                 cache_dir: str | Path | None = None,
                 _expect: LlmRef | None = None) -> None:  # fmt: skip
        self.config = ChatConfig(
            llm={}, hidden=0,  # the LLM's, below
            image_encoder=image_encoder, image_kwargs=image_kwargs or {"image_size": 128},
            image_tokens=image_tokens, audio_encoder=audio_encoder, audio_tokens=audio_tokens,
            max_length=max_length, system=system,
        )  # fmt: skip
        self.fit_config = fit or ChatFitConfig()
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._towers: dict[str, Tower] = {}
        # the towers before the LLM: building Whisper's peaks 0.2 GB above what it keeps,
        # which is better spent before the LLM's 1 GB of weights are resident than after
        self.config.image_dim = self.tower("image").dim
        self.config.audio_dim = self.tower("audio").dim
        model, tokenizer, ref = load_llm(llm, expect=_expect)
        self.tokenizer = tokenizer
        self.ref = ref
        self.config.llm, self.config.hidden = ref.to_dict(), int(model.config.hidden_size)
        self.format = ChatFormat(tokenizer, image_tokens, audio_tokens)
        self.model = ChatModel(self.config, model, self.format.image_id, self.format.audio_id)
        self.history: dict[str, Any] = {}
        # this process's DDP rank in the last fit (0: the one that writes), of how many
        self.rank, self.processes = 0, 1
        self.test_manifest: list | None = None  # the held-out conversations after fit()
        self.bundle = None
        self._engine = None
        self._media_cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._media_lock = threading.Lock()

    # -- towers ---------------------------------------------------------------------------------
    def tower(self, kind: str, encoder_module=None) -> Tower:
        """The frozen image or audio tower (built on first use)."""
        if kind not in self._towers:
            c = self.config
            if kind == "image":
                self._towers[kind] = Tower(Modality.IMAGE, c.image_encoder, c.image_kwargs,
                                           c.image_tokens, encoder_module)  # fmt: skip
            elif kind == "audio":
                self._towers[kind] = Tower(Modality.AUDIO, c.audio_encoder, c.audio_kwargs,
                                           c.audio_tokens, encoder_module)  # fmt: skip
            else:
                raise ValueError(f"no {kind!r} tower (image or audio)")
        return self._towers[kind]

    def _media_tokens(self, conversations, progress: bool):
        """{kind: {path: (tokens, dim) tensor}} for every image and clip the conversations use,
        through the feature cache."""
        from modalforge.data.cache import FeatureCache

        cache = FeatureCache(self.cache_dir)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for kind in ("image", "audio"):
            values = sorted({str(getattr(c, kind)) for c in conversations
                             if getattr(c, kind) is not None})  # fmt: skip
            if not values:
                out[kind] = {}
                continue
            tokens, _ = self.tower(kind).features(cache, values, None, progress,
                                                  self.fit_config.batch_size * 4)  # fmt: skip
            out[kind] = dict(zip(values, tokens, strict=True))
        return out

    # -- data -----------------------------------------------------------------------------------
    def _turns(self, conversation) -> list[Turn]:
        turns = [Turn(t.role, t.text) for t in conversation.turns]
        if self.config.system and not (turns and turns[0].role == "system"):
            turns.insert(0, Turn("system", self.config.system))
        return turns

    def _examples(self, conversations, media) -> list[Example]:
        out = []
        for c in conversations:
            encoded = self.format.encode(self._turns(c))
            encoded = _truncate(encoded, self.config.max_length,
                                {"image": self.config.image_tokens,
                                 "audio": self.config.audio_tokens})  # fmt: skip
            image = media["image"].get(str(c.image)) if c.image is not None else None
            audio = media["audio"].get(str(c.audio)) if c.audio is not None else None
            out.append(Example(encoded, image, audio))
        return out

    def _loader(self, examples: list[Example], shuffle: bool):
        pad = self.tokenizer.pad_token_id or 0
        return torch.utils.data.DataLoader(
            Examples(examples), batch_size=self.fit_config.batch_size, shuffle=shuffle,
            collate_fn=lambda b: collate(b, pad), num_workers=self.fit_config.num_workers,
            generator=torch.Generator().manual_seed(self.fit_config.seed) if shuffle else None,
        )  # fmt: skip

    # -- training -------------------------------------------------------------------------------
    def fit(self, data: str | Path, out_dir: str | Path | None = None, *, root=None,
            resume: bool = False, progress: bool = True) -> ChatPredictor:  # fmt: skip
        """Train on the ``train`` conversations of ``data`` (LLaVA JSONL; media under ``root``,
        default its folder), early-stopping on ``val``: stage 1 trains the projectors, stage 2
        (``stage2_epochs`` > 0) adds LoRA."""
        from modalforge.tasks.chat.data import cap_per_type, read_conversations
        from modalforge.train.loop import LoopSettings, fit_module

        torch.manual_seed(self.fit_config.seed)
        random.seed(self.fit_config.seed)
        conversations = read_conversations(data, root)  # media paths come back resolved
        parts = _split(conversations, self.fit_config.seed)
        if self.fit_config.max_per_type:
            for name in ("train", "val"):
                parts[name] = cap_per_type(parts[name], self.fit_config.max_per_type,
                                           self.fit_config.seed)  # fmt: skip
        self.test_manifest = parts["test"]  # what train_run evaluates
        t0 = time.perf_counter()
        media = self._media_tokens(parts["train"] + parts["val"], progress)
        encode_seconds = time.perf_counter() - t0
        train = self._examples(parts["train"], media)
        val = self._examples(parts["val"], media)
        run = (
            Path(out_dir)
            if out_dir is not None
            else Path("runs") / time.strftime("chat-%Y%m%d-%H%M%S")
        )
        run.mkdir(parents=True, exist_ok=True)
        cfg = self.fit_config
        stages = []
        for stage, epochs, lr in ((1, cfg.stage1_epochs, cfg.stage1_lr),
                                  (2, cfg.stage2_epochs, cfg.stage2_lr)):  # fmt: skip
            if epochs <= 0:
                continue
            if stage == 2 and self.config.lora is None:
                self.model.add_lora(cfg.lora)
            steps = epochs * -(-len(train) // cfg.batch_size)
            # the base model all but never predicts <end_of_turn> (-30 nats): left in stage 1's
            # loss, that one token's gradient would drown what the projectors are to learn, and
            # the frozen LLM cannot learn it anyway; LoRA learns to stop in stage 2
            skip = (self.format.end_id,) if stage == 1 else ()
            module = ChatModule(self.model, lr, cfg.weight_decay, total_steps=steps,
                                skip_ids=skip)  # fmt: skip
            settings = LoopSettings(epochs, cfg.patience, cfg.accelerator, cfg.devices,
                                    cfg.strategy, cfg.num_nodes, cfg.precision)  # fmt: skip
            loop = fit_module(module, self._loader(train, True), self._loader(val, False),
                              run / f"stage{stage}", settings, "val_loss", "min", resume,
                              progress)  # fmt: skip
            stages.append({"stage": stage, "lr": lr, **loop})
        self.model.eval()
        self.history = {"stages": stages, "encode_seconds": round(encode_seconds, 3),
                        "train_seconds": round(sum(s["train_seconds"] for s in stages), 3),
                        "epochs_run": sum(s["epochs_run"] for s in stages),
                        "rows": {k: len(v) for k, v in parts.items()},
                        "fit": asdict(cfg)}  # fmt: skip
        if stages:
            self.rank, self.processes = stages[-1]["rank"], stages[-1]["processes"]
        if self.rank == 0:  # under DDP only rank 0 writes (train_run: evaluates, saves)
            atomic_write_json(run / "history.json", self.history, default=str)
        self.run_dir = run
        self._engine = None
        return self

    # -- bundle ---------------------------------------------------------------------------------
    def save(self, path: str | Path, metrics: dict[str, Any] | None = None,
             overwrite: bool = False):  # fmt: skip
        from modalforge.bundle import save_bundle

        config = self.config.to_dict()
        config["preprocessing"] = {k: self.tower(k).encoder.preprocessing
                                   for k in ("image", "audio")}  # fmt: skip
        return save_bundle(
            path, task=TASK, schema=SCHEMA, label_column=None, labels=None,
            model_config=config, state_dict=self.model.trained_state(), metrics=metrics or {},
            extra={"history": self.history}, overwrite=overwrite,
        )  # fmt: skip

    @classmethod
    def from_bundle(cls, bundle, variant: str = "pytorch", cache_dir=None, device=None,
                    llm: str | None = None) -> ChatPredictor:  # fmt: skip
        """The chat model of ``bundle``: its LLM from the cache (sha256 checked; ``llm`` names
        another copy of the same weights), its towers, projectors and adapters."""
        config = ChatConfig.from_dict(bundle.model_config)
        predictor = cls(
            image_tokens=config.image_tokens, audio_tokens=config.audio_tokens,
            image_encoder=config.image_encoder, image_kwargs=config.image_kwargs,
            audio_encoder=config.audio_encoder, max_length=config.max_length,
            system=config.system, cache_dir=cache_dir, llm=llm,
            _expect=LlmRef.from_dict(config.llm),
        )  # fmt: skip
        if config.lora is not None:
            predictor.model.add_lora(config.lora)
        predictor.model.load_trained_state(bundle.state_dict(variant))
        predictor.model.eval()
        predictor.history = bundle.extra.get("history") or {}
        predictor.bundle = bundle
        return predictor

    @classmethod
    def load(cls, path: str | Path, cache_dir=None, variant: str = "pytorch") -> ChatPredictor:
        from modalforge.tasks import load

        return load(path, variant=variant, cache_dir=cache_dir, kind=cls)

    def evaluate(self, data, out_dir: str | Path | None = None, split: str | None = "test",
                 root=None, progress: bool = True, baselines: dict[str, str] | None = None,
                 **_ignored) -> dict[str, Any]:  # fmt: skip
        """Scores per question type on ``data`` (conversations, or a JSONL of them whose
        ``split`` rows are taken) -- see ``tasks.chat.evaluation`` -- and of the ``baselines``
        (kind -> bundle: ``tasks.chat.compare``) on the same questions."""
        from modalforge.tasks.chat.data import read_conversations
        from modalforge.tasks.chat.evaluation import evaluate_chat

        if isinstance(data, str | Path):
            data = read_conversations(data, root)
            if split is not None:
                data = [c for c in data if c.split == split]
        return evaluate_chat(self, list(data), out_dir, progress, baselines=baselines)

    def describe(self) -> dict[str, Any]:
        return {"task": TASK, "model": self.config.to_dict(), "fit": asdict(self.fit_config)}

    # -- talking --------------------------------------------------------------------------------
    def engine(self, inplace: bool = False, **options):
        """The decoding engine over the LLM with the adapters merged in (built once; options:
        ``LlmEngine``'s, e.g. ``quantize="int8"``, ``max_slots``). ``inplace`` merges them into
        the model's own LLM (``ChatModel.merge_lora``: no second copy, for a predictor that
        only answers from now on -- a server, the ``chat`` command) rather than a copy."""
        from modalforge.llm.engine import LlmEngine

        if self._engine is None or options or (inplace and self.model.adapted):
            llm = self.model.merge_lora() if inplace else self.model.merged_llm()
            self._engine = LlmEngine(llm, self.tokenizer, **options)
        return self._engine

    @torch.no_grad()
    def prompt(self, turns, image=None, audio=None, root: Path | None = None,
               media_tokens: dict[str, torch.Tensor] | None = None) -> Prompt:  # fmt: skip
        """The engine's prompt for ``turns`` (a generation prompt follows the last turn):
        ``image`` / ``audio`` are paths (under ``root``) or bytes, decoded and encoded here,
        or their tower tokens in ``media_tokens``. A user turn without a mark for given media
        gets it in front of its text, as LLaVA does."""
        turns = [Turn(t.role, t.text) for t in turns]
        if self.config.system and not (turns and turns[0].role == "system"):
            turns.insert(0, Turn("system", self.config.system))
        media = dict(media_tokens or {})
        for kind, value in (("image", image), ("audio", audio)):
            if value is not None and kind not in media:
                media[kind] = self.tower_tokens(kind, value, root)
        _place_marks(turns, media)
        encoded = self.format.encode(turns, add_generation_prompt=True)
        spans = []
        for kind, start in encoded.spans:
            if kind not in media:
                raise ValueError(f"the conversation has an <{kind}> mark but no {kind} was given")
            tokens = media[kind]
            embeds = self.model.project(kind, tokens)
            key = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:24]
            spans.append(EmbedSpan(start, embeds.float(), f"{kind}:{key}"))
        return Prompt(encoded.ids, spans)

    def tower_tokens(self, kind: str, value, root: Path | None = None) -> torch.Tensor:
        """One item's tower tokens (tokens, dim); bytes (a request's media) go through a small
        cache keyed by their sha256, so a conversation's later turns do not encode its image
        again. Raises DecodeError for undecodable media."""
        tower = self.tower(kind)
        if not isinstance(value, bytes | bytearray):
            return tower.encode([tower.load(value, root)])[0]
        key = (kind, hashlib.sha256(value).hexdigest())
        with self._media_lock:
            found = self._media_cache.get(key)
            if found is not None:
                self._media_cache.move_to_end(key)
                return found
        tokens = tower.encode([tower.load(value, root)])[0]
        with self._media_lock:
            self._media_cache[key] = tokens
            while len(self._media_cache) > MEDIA_CACHE_ITEMS:
                self._media_cache.popitem(last=False)
        return tokens

    def reply(
        self,
        turns,
        image=None,
        audio=None,
        params: SamplingParams | None = None,
        root: Path | None = None,
    ) -> str:
        """The assistant's next turn (greedy unless ``params`` say otherwise)."""
        prompt = self.prompt(turns, image, audio, root)
        params = params or SamplingParams(max_tokens=64, temperature=0.0)
        return self.engine().generate([prompt], params)[0].text.strip()


def from_options(options, encoders, fit, schema) -> ChatPredictor:
    """``modalforge train --task chat``'s options -> a predictor. The manifest is a LLaVA JSONL;
    ``task_options`` holds the chat settings (``llm``, ``image_tokens``, ``audio_tokens``,
    ``max_length``, ``system``, and ChatFitConfig's fields: ``stage1_epochs``, ``stage2_lr``,
    ``lora``, ``max_per_type``, ...); ``batch_size``, ``seed``, ``patience``, ``precision`` and
    ``encoders`` come from the common options."""
    extra = dict(options.task_options or {})
    model_keys = ("llm", "image_tokens", "audio_tokens", "max_length", "system")
    model = {k: extra.pop(k) for k in model_keys if k in extra}
    fit_keys = ChatFitConfig.__dataclass_fields__
    unknown = sorted(set(extra) - set(fit_keys))
    if unknown:
        raise ValueError(f"task_options: unknown chat option(s) {unknown} (known: "
                         f"{sorted([*model_keys, *fit_keys])})")  # fmt: skip
    fit_config = ChatFitConfig(batch_size=options.batch_size, seed=options.seed,
                               patience=options.patience, accelerator=fit.accelerator,
                               devices=fit.devices, strategy=fit.strategy,
                               num_nodes=fit.num_nodes, **extra)  # fmt: skip
    if options.precision:
        fit_config.precision = options.precision
    image, audio = encoders.get("image"), encoders.get("audio")
    kwargs: dict[str, Any] = {}
    if image is not None:
        kwargs |= {"image_encoder": image.name, "image_kwargs": image.kwargs}
    if audio is not None:
        kwargs["audio_encoder"] = audio.name
    return ChatPredictor(**model, **kwargs, fit=fit_config, cache_dir=options.cache_dir)


def _place_marks(turns: list[Turn], media: dict[str, Any]) -> None:
    """Put a missing ``<image>`` / ``<audio>`` mark in front of the first user turn."""
    users = [t for t in turns if t.role == "user"]
    if not users:
        raise ValueError("a conversation needs at least one user turn")
    for kind, mark in (("audio", AUDIO_MARK), ("image", IMAGE_MARK)):
        if kind in media and not any(mark in t.text for t in users):
            users[0].text = f"{mark}\n{users[0].text}"


def _truncate(encoded: Encoded, max_length: int, span_lengths: dict[str, int]) -> Encoded:
    """Cut a conversation to ``max_length`` tokens, never inside a media span."""
    if len(encoded) <= max_length:
        return encoded
    cut = max_length
    for kind, start in encoded.spans:
        if start < cut < start + span_lengths[kind]:
            cut = start
    spans = [(k, s) for k, s in encoded.spans if s < cut]
    return Encoded(encoded.ids[:cut], encoded.labels[:cut], spans)


def _split(conversations, seed: int) -> dict[str, list]:
    """Conversations by their ``split`` (train / val / test); without one, a seeded 90/10
    train/val split of those that have none."""
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    loose = []
    for c in conversations:
        if c.split in parts:
            parts[c.split].append(c)
        elif c.split in (None, ""):
            loose.append(c)
        else:
            raise ValueError(f"conversation {c.id}: split must be train, val or test, "
                             f"not {c.split!r}")  # fmt: skip
    random.Random(seed).shuffle(loose)
    n_val = max(1, len(loose) // 10) if loose and not parts["val"] else 0
    parts["val"] += loose[:n_val]
    parts["train"] += loose[n_val:]
    if not parts["train"] or not parts["val"]:
        raise ValueError(f"need train and val conversations, got {len(parts['train'])} train "
                         f"and {len(parts['val'])} val")  # fmt: skip
    return parts


__all__ = ["ChatFitConfig", "ChatPredictor", "Turn", "from_options"]
