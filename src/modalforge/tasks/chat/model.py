"""The multimodal LLM: frozen towers -> trained projectors -> tokens spliced into the LLM.

As LLaVA-1.5: each tower's output tokens go through a 2-layer MLP (GELU) to the LLM's width and
replace the placeholder tokens' input embeddings. Stage 1 trains the projectors alone; stage 2
adds LoRA adapters (peft) on the LLM's attention and MLP projections. The loss is the next-token
cross-entropy on the answer tokens only, and the 262,144-way output matrix (most of the model)
is applied only at those positions, never at every position of the sequence.

The towers (``towers.py``) are frozen and their tokens come from the feature cache, so a
training step runs the LLM only.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modalforge.tasks.chat.format import IGNORE

#: LoRA defaults: every linear map of the attention and the MLP, as QLoRA found best
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ChatConfig:
    """What a chat bundle's ``model_config`` holds (the LLM itself is a reference)."""

    llm: dict[str, str]  # LlmRef.to_dict(): source + sha256 of the weights
    hidden: int  # the LLM's width
    image_encoder: str = "efficientnet_lite0"
    image_kwargs: dict[str, Any] = field(default_factory=lambda: {"image_size": 128})
    image_tokens: int = 16  # a square: the grid is average-pooled to sqrt x sqrt
    image_dim: int = 1280
    audio_encoder: str = "whisper_tiny_en"
    audio_kwargs: dict[str, Any] = field(default_factory=dict)
    audio_tokens: int = 8  # the clip's frames average-pooled into this many segments
    audio_dim: int = 384
    projector_hidden: int | None = None  # default: the LLM's width
    lora: dict[str, Any] | None = None  # {"r", "alpha", "dropout", "targets"} once stage 2 ran
    max_length: int = 512  # tokens of one training conversation (longer ones are cut)
    system: str | None = None  # a system prompt put before every conversation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatConfig:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


class Projector(nn.Sequential):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear."""

    def __init__(self, dim_in: int, dim_out: int, hidden: int | None = None) -> None:
        hidden = hidden or dim_out
        super().__init__(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


def lora_config(options: dict[str, Any]):
    from peft import LoraConfig

    return LoraConfig(
        r=int(options.get("r", 16)),
        lora_alpha=int(options.get("alpha", 32)),
        lora_dropout=float(options.get("dropout", 0.05)),
        target_modules=list(options.get("targets", LORA_TARGETS)),
        bias="none",
    )


class ChatModel(nn.Module):
    def __init__(self, config: ChatConfig, llm: nn.Module, image_id: int, audio_id: int) -> None:
        super().__init__()
        self.config = config
        self.llm = llm
        self.image_id, self.audio_id = image_id, audio_id
        width = config.projector_hidden
        self.image_proj = Projector(config.image_dim, config.hidden, width)
        self.audio_proj = Projector(config.audio_dim, config.hidden, width)
        self.llm.requires_grad_(False)
        self.merged = False  # the LoRA adapters folded into the LLM for good (merge_lora)

    # -- stages -----------------------------------------------------------------------------
    def add_lora(self, options: dict[str, Any]) -> None:
        """Wrap the LLM with LoRA adapters (stage 2); only they and the projectors train."""
        from peft import get_peft_model

        if self.config.lora is not None:
            raise RuntimeError("the model has LoRA adapters already")
        self.llm = get_peft_model(self.llm, lora_config(options))
        self.config.lora = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": list(LORA_TARGETS),
                            **options}  # fmt: skip

    def base_llm(self) -> nn.Module:
        """The causal LM under any adapters (its ``.model`` is the decoder stack)."""
        return self.llm.get_base_model() if self.adapted else self.llm

    @property
    def adapted(self) -> bool:
        """Whether the LLM is wrapped in LoRA adapters (not yet merged into it)."""
        return self.config.lora is not None and not self.merged

    def merged_llm(self) -> nn.Module:
        """A plain causal LM with the LoRA adapters folded into its weights (for decoding); the
        model itself is left as it is. The copy shares the token embedding (no adapter touches
        it: 63 % of the weights), so it costs the adapted layers only."""
        if not self.adapted:
            return self.llm
        embedding = self.base_llm().get_input_embeddings().weight
        return copy.deepcopy(self.llm, {id(embedding): embedding}).merge_and_unload()

    def merge_lora(self) -> nn.Module:
        """Fold the LoRA adapters into the LLM itself and return it: for a model that only
        decodes from now on (a server), which needs no second copy of the weights. Its adapters
        are gone afterwards: ``trained_state`` refuses, so save the bundle first."""
        if self.adapted:
            self.llm = self.llm.merge_and_unload()
            self.merged = True
        return self.llm

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What a bundle stores: the projectors and the LoRA adapters, never the LLM."""
        if self.merged:
            raise RuntimeError("the LoRA adapters were merged into the LLM (merge_lora): "
                               "they can no longer be saved apart from it")  # fmt: skip
        state = {f"image_proj.{k}": v for k, v in self.image_proj.state_dict().items()}
        state |= {f"audio_proj.{k}": v for k, v in self.audio_proj.state_dict().items()}
        if self.adapted:
            from peft import get_peft_model_state_dict

            state |= {f"lora.{k}": v for k, v in get_peft_model_state_dict(self.llm).items()}
        return state

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, module in (("image_proj", self.image_proj), ("audio_proj", self.audio_proj)):
            module.load_state_dict({k[len(name) + 1 :]: v for k, v in state.items()
                                    if k.startswith(name + ".")})  # fmt: skip
        lora = {k[5:]: v for k, v in state.items() if k.startswith("lora.")}
        if lora:
            if self.config.lora is None:
                raise ValueError("the weights hold LoRA adapters but the config names none")
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.llm, lora)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"LoRA weights that fit no adapter: {unexpected[:3]}")

    # -- embeddings ---------------------------------------------------------------------------
    def input_embeddings(self, ids: torch.Tensor, image: torch.Tensor | None = None,
                         audio: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """(B, T) ids -> (B, T, H) input embeddings, the placeholder positions replaced by the
        projected tower tokens in order: ``image`` (K, image_tokens, image_dim) for the K
        image slots in the batch (row-major), ``audio`` likewise."""
        embeds = self.base_llm().get_input_embeddings()(ids)
        for pad_id, tokens, proj in ((self.image_id, image, self.image_proj),
                                     (self.audio_id, audio, self.audio_proj)):  # fmt: skip
            slots = ids == pad_id
            n = int(slots.sum())
            if n == 0:
                continue
            if tokens is None or tokens.shape[0] * tokens.shape[1] != n:
                have = 0 if tokens is None else tokens.shape[0] * tokens.shape[1]
                raise ValueError(f"{n} placeholder positions but {have} tower tokens")
            projected = proj(tokens.to(embeds.dtype)).reshape(n, -1)
            embeds = embeds.masked_scatter(slots[..., None], projected.to(embeds.dtype))
        return embeds

    def project(self, kind: str, tokens: torch.Tensor) -> torch.Tensor:
        """One item's tower tokens (N, D) -> (N, H) embeddings, for a prompt span (in the
        projector's dtype: an int8 decoder keeps the LLM's token table in bf16)."""
        proj = self.image_proj if kind == "image" else self.audio_proj
        return proj(tokens.to(proj[0].weight.dtype))

    # -- training -----------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor],
             skip_ids: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Mean cross-entropy over the answer tokens (but ``skip_ids``) and the accuracy of
        their argmax."""
        ids, labels = batch["ids"], batch["labels"]
        embeds = self.input_embeddings(ids, batch.get("image"), batch.get("audio"))
        base = self.base_llm()
        decoder = base.model  # the LoRA layers are inside it
        hidden = decoder(inputs_embeds=embeds,
                         attention_mask=batch["attention_mask"]).last_hidden_state  # fmt: skip
        target = labels[:, 1:]
        where = target != IGNORE
        for skip in skip_ids:
            where &= target != skip
        chosen = hidden[:, :-1][where]  # (n, H): the positions that predict an answer token
        if chosen.shape[0] == 0:  # every answer was cut off: nothing to learn from this batch
            zero = hidden.sum() * 0.0
            return zero, zero.detach()
        logits = base.lm_head(chosen).float()
        cap = getattr(base.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        gold = target[where]
        loss = F.cross_entropy(logits, gold)
        accuracy = (logits.argmax(-1) == gold).float().mean()
        return loss, accuracy


__all__ = ["LORA_TARGETS", "ChatConfig", "ChatModel", "Projector", "lora_config"]
