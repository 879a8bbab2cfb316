"""The task registry: every kind of model modalforge trains, serves and exports declares itself
here, once -- the only place a task name is looked up.

Entries name their classes lazily (``"module:attribute"``, as vLLM's model registry does), so no
task module is imported until it is used and nothing below the tasks imports upwards. What an
entry declares:

* ``name`` (what bundles write in ``task``) and ``aliases`` (other names of the same task: a
  regression bundle says ``regression``);
* ``predictor``: the Python API (fit / evaluate / save; ``from_bundle`` rebuilds one);
* ``serving``: the ``tasks.serving.ServingAdapter`` that turns decoded requests into answers;
* ``config``: the model-config dataclass saved in bundles;
* ``onnx_model`` / ``exporter``: the runtime model of an ONNX variant and the function that
  writes and gates one;
* ``options``: ``modalforge train``'s options -> a predictor; ``implied_by``: the options that
  mean this task when ``--task`` is not given (``--pairs`` is contrastive);
* ``capabilities``: what the model can do (routes are mounted by them, commands check them);
* ``refines`` + ``claims``: a task whose bundles are another's (a VQA model is a classifier of
  one image and one text) claims those bundles whose schema ``claims`` accepts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

#: what a model can do; serving mounts routes by these, commands check them
PREDICT = "predict"  # /v1/predict answers with a label or value
EMBED = "embed"  # /v1/embeddings, index build / search
CAPTION = "caption"  # /v1/caption, modalforge caption
CHAT = "chat"  # /v1/chat/completions (a captioner's or VQA model's one answer)
LLM = "llm"  # an LLM: /v1/chat/completions with streaming and sampling, /v1/completions
TRANSCRIBE = "transcribe"  # /v1/audio/transcriptions
ONNX = "onnx"  # modalforge export --format onnx
QUANTIZE = "quantize"  # export --quantize int8
PRUNE = "prune"  # export --prune
DISTILL = "distill"  # export --distill-into (a student on the soft targets)
EXPERIMENTS = "experiments"  # sweep / cv / ensemble


@dataclass(frozen=True)
class TaskSpec:
    name: str
    summary: str  # "a {summary} bundle" in messages
    predictor: str
    serving: str
    capabilities: frozenset[str]
    aliases: tuple[str, ...] = ()
    config: str | None = None
    onnx_model: str | None = None
    exporter: str | None = None
    options: str | None = None
    implied_by: tuple[str, ...] = ()
    refines: str | None = None
    claims: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def resolve(self, part: str) -> Any:
        """The object an entry names (``part``: "predictor", "serving", "config", ...)."""
        target = getattr(self, part)
        if target is None:
            raise LookupError(f"the {self.name} task has no {part}")
        module, _, attribute = target.partition(":")
        return getattr(importlib.import_module(module), attribute)


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        name="classification",
        aliases=("regression",),
        summary="classification / regression",
        predictor="modalforge.tasks.classification:MultimodalPredictor",
        serving="modalforge.tasks.classification:ClassifierServing",
        config="modalforge.models.multimodal:ModelConfig",
        onnx_model="modalforge.runtime.onnx:OrtModel",
        exporter="modalforge.export.variants:export_fused",
        options="modalforge.tasks.classification:from_options",
        capabilities=frozenset({PREDICT, ONNX, QUANTIZE, PRUNE, DISTILL, EXPERIMENTS}),
    ),
    TaskSpec(
        name="vqa",
        refines="classification",
        claims="modalforge.tasks.vqa:answers_questions",
        summary="visual question answering",
        predictor="modalforge.tasks.classification:MultimodalPredictor",
        serving="modalforge.tasks.vqa:VqaServing",
        config="modalforge.models.multimodal:ModelConfig",
        onnx_model="modalforge.runtime.onnx:OrtModel",
        exporter="modalforge.export.variants:export_fused",
        capabilities=frozenset({PREDICT, CHAT, ONNX, QUANTIZE, PRUNE, DISTILL, EXPERIMENTS}),
    ),
    TaskSpec(
        name="contrastive",
        summary="contrastive",
        predictor="modalforge.tasks.contrastive:ContrastivePredictor",
        serving="modalforge.tasks.contrastive:EmbeddingServing",
        config="modalforge.models.contrastive:ContrastiveConfig",
        onnx_model="modalforge.runtime.onnx:OrtTowers",
        exporter="modalforge.export.variants:export_towers",
        options="modalforge.tasks.contrastive:from_options",
        implied_by=("pairs",),
        capabilities=frozenset({EMBED, ONNX}),
    ),
    TaskSpec(
        name="caption",
        summary="captioning",
        predictor="modalforge.tasks.caption:CaptionPredictor",
        serving="modalforge.tasks.caption:CaptionServing",
        config="modalforge.models.caption:CaptionConfig",
        onnx_model="modalforge.runtime.caption:OrtCaptioner",
        exporter="modalforge.export.caption:export_caption_bundle",
        options="modalforge.tasks.caption:from_options",
        implied_by=("caption",),
        capabilities=frozenset({CAPTION, CHAT, ONNX}),
    ),
    TaskSpec(
        name="chat",
        summary="multimodal chat LLM",
        predictor="modalforge.tasks.chat.predictor:ChatPredictor",
        serving="modalforge.tasks.chat.serving:ChatServing",
        config="modalforge.tasks.chat.model:ChatConfig",
        options="modalforge.tasks.chat.predictor:from_options",
        capabilities=frozenset({LLM}),
    ),
    TaskSpec(
        name="transcribe",
        aliases=("transcription",),
        summary="speech-to-text",
        predictor="modalforge.tasks.transcription:Transcriber",
        serving="modalforge.tasks.transcription:TranscriptionServing",
        config="modalforge.tasks.transcription:TranscriptionConfig",
        capabilities=frozenset({TRANSCRIBE}),
    ),
)


def list_tasks() -> list[TaskSpec]:
    return list(TASKS)


def get(name: str) -> TaskSpec:
    """The entry called ``name`` (or with that alias)."""
    for spec in TASKS:
        if name in spec.names:
            return spec
    known = sorted(n for spec in TASKS for n in spec.names)
    raise KeyError(f"unknown task {name!r} (known: {', '.join(known)})")


def spec_for(task: str, schema=None) -> TaskSpec:
    """The entry for a model whose bundle says ``task``: the task itself, or a task refining it
    whose ``claims`` accepts ``schema``."""
    base = get(task)
    if schema is not None:
        for spec in TASKS:
            if spec.refines == base.name and spec.resolve("claims")(schema):
                return spec
    return base


def for_bundle(bundle) -> TaskSpec:
    return spec_for(bundle.task, bundle.schema)


def trainable() -> list[str]:
    """The ``--task`` names ``modalforge train`` takes."""
    return [n for spec in TASKS if spec.options is not None for n in spec.names]


def implied_task(options) -> str | None:
    """The task ``options`` ask for: ``options.task``, else the first whose ``implied_by``
    options are set (``pairs`` -> contrastive, ``caption`` -> caption), else None (guessed
    from the label later)."""
    if options.task:
        return options.task
    for spec in TASKS:
        if any(getattr(options, flag, None) for flag in spec.implied_by):
            return spec.name
    return None


def with_capability(capability: str) -> list[TaskSpec]:
    return [spec for spec in TASKS if spec.can(capability)]


__all__ = [
    "TASKS",
    "TaskSpec",
    "for_bundle",
    "get",
    "implied_task",
    "list_tasks",
    "spec_for",
    "trainable",
    "with_capability",
]
