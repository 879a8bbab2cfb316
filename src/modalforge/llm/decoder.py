"""Gemma-3's forward over a slot KV cache: prefill one sequence, decode many in one batch.

The engine decodes many conversations at once, each at its own length, and joins / drops them
between steps. transformers' generic cache and mask machinery is built for a rectangular batch
that starts together, and its forward computes logits for every position it is given (the
output matrix is 262,144 x 640, 63% of Gemma-3-270M's weights). So this module runs the same
math itself over the HF model's weights (``Gemma3ForCausalLM``: its modules are reused, except
that q / k / v and gate / up are fused into one matmul each, a copy of those weights) with:

* a slot cache: one preallocated tensor ``[layers, 2 (k / v), slots, kv_heads, capacity,
  head_dim]`` plus a length per slot; capacity grows (doubling, up to ``max_len``) with the
  longest sequence, so memory follows use rather than the worst case;
* ``prefill(slot, embeds)``: append ``n`` positions to one slot, return the last one's logits;
* ``decode(slots, embeds)``: append one position to each of ``B`` slots in one batched
  forward (attention masked to each slot's own length), return ``[B, vocab]`` logits.

``quantize="int8"`` makes the model the decoder's own, no longer a runnable HF model: the
fused projections replace q / k / v and gate / up, they and the remaining Linear layers (o,
down and the tied output matrix) become dynamically quantized int8 ones, in place, so their
fp32 weights are freed, and the token table for lookups is kept in bf16 (rows cast to fp32 as
they are looked up). For Gemma-3-270M that is 1.6 GB of server RSS instead of 2.9 GB.
"""

from __future__ import annotations

import gc
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

SLIDING = "sliding_attention"
FULL = "full_attention"


def _rope_tables(inv_freq: torch.Tensor, scaling: float, n: int) -> tuple[torch.Tensor, ...]:
    """cos / sin for positions 0..n-1, as HF's ``Gemma3RotaryEmbedding.forward`` computes them."""
    freqs = torch.arange(n, dtype=torch.float, device=inv_freq.device)[:, None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class _Norm:
    """Gemma's RMSNorm: normalise in fp32, scale by ``1 + weight`` (precomputed here), cast back."""

    def __init__(self, module: nn.Module):
        self.scale = 1.0 + module.weight.detach().float()
        self.eps = module.eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.scale.shape, self.scale, self.eps).to(x.dtype)


def _fuse(parent: nn.Module, names: tuple[str, ...], quantize: str | None) -> nn.Module:
    """One Linear whose output is ``parent``'s ``names`` Linears' outputs side by side (a copy
    of their weights; ``split_sizes`` their widths): one matmul, and on the CPU one thread-pool
    handoff, instead of several. Quantized here, one at a time, so that no more than one fused
    fp32 copy is ever alive; quantized, the originals leave ``parent`` (freed: the model is
    then the decoder's own, see the module docstring)."""
    linears = [getattr(parent, name) for name in names]
    sizes = [m.out_features for m in linears]
    weight = torch.cat([m.weight.detach() for m in linears])
    has_bias = linears[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        bias = torch.cat([m.bias.detach() for m in linears])
        fused.bias = nn.Parameter(bias, requires_grad=False)
    if quantize == "int8":
        for name in names:
            setattr(parent, name, None)
        del linears, weight
        holder = nn.ModuleList([fused])  # quantize_dynamic swaps children, not the root
        quantize_int8(holder)
        fused = holder[0]
    fused.split_sizes = sizes
    return fused


class _Layer:
    """One decoder layer's weights, looked up once so the hot loop does no attribute walks.
    q / k / v and gate / up run as one fused Linear each (``fused``: the pair from ``_fuse``)."""

    def __init__(self, layer: nn.Module, layer_type: str, fused: nn.ModuleList):
        attn = layer.self_attn
        self.layer_type = layer_type
        self.qkv, self.gate_up = fused
        self.qkv_sizes, self.mlp_sizes = self.qkv.split_sizes, self.gate_up.split_sizes
        self.o, self.down = attn.o_proj, layer.mlp.down_proj
        self.q_norm, self.k_norm = _Norm(attn.q_norm), _Norm(attn.k_norm)
        self.norms = [_Norm(getattr(layer, name)) for name in (
            "input_layernorm", "post_attention_layernorm",
            "pre_feedforward_layernorm", "post_feedforward_layernorm",
        )]  # fmt: skip


def quantize_int8(model: nn.Module) -> None:
    """Replace ``model``'s Linear layers by int8 dynamically quantized ones, in place.

    In place, so the fp32 weights of the replaced layers are freed (a copy would hold both).
    A tied output matrix is ``_quantize_output``'s.
    """
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("quantize='int8' runs on the CPU only (dynamic int8 kernels)")
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not a dependency
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
        from torch.ao.quantization import quantize_dynamic

        quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    # (``load_llm`` reads weights into the process's own memory: views into a memory-mapped
    # file would keep its fp32 pages resident beside the int8 copies)
    gc.collect()  # the replaced Linear modules sit in reference cycles: free them now
    _trim_heap()


def _quantize_output(model: nn.Module) -> None:
    """Give the output matrix, tied to the token embedding, an int8 dynamic Linear of its own
    (per-tensor symmetric, as ``quantize_dynamic`` quantizes) and keep the table for lookups in
    bf16. The fp32 table (63 % of Gemma-3-270M) goes first, so the process never holds more
    than it and its bf16 copy at once (``quantize_dynamic`` on the tied ``lm_head`` peaked
    0.5 GB above the fp32 table and its int8 copy)."""
    embedding = model.get_input_embeddings()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        low, high = torch.aminmax(embedding.weight)  # (abs() would be a full fp32 copy)
        scale = max(-float(low), float(high)) / 127.5 or 1.0
        embedding.weight = nn.Parameter(embedding.weight.to(torch.bfloat16), requires_grad=False)
        model.lm_head = None  # the fp32 table's last holder here
        gc.collect()
        table = embedding.weight
        ints = torch.empty(table.shape, dtype=torch.int8)
        for start in range(0, table.shape[0], 8192):  # fp32 a block of rows at a time
            block = table[start : start + 8192].float().div_(scale).round_().clamp_(-128, 127)
            ints[start : start + 8192] = block.to(torch.int8)
        qweight = torch._make_per_tensor_quantized_tensor(ints, scale, 0)
        del ints
        head = DynamicLinear(1, 1, bias_=False, dtype=torch.qint8)  # a 1 x 1 placeholder...
        head.set_weight_bias(qweight, None)  # ...given the real weight: no second full one
        head.in_features, head.out_features = qweight.shape[1], qweight.shape[0]
        model.lm_head = head
    del qweight
    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    """Give freed heap memory back to the OS. glibc keeps what the replaced fp32 weights and
    the quantization's temporaries occupied (measured: 1.0 GB of RSS on Gemma-3-270M, which
    ``malloc_trim`` returned); elsewhere this does nothing."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:  # not glibc
        pass


class SlotDecoder:
    """A ``Gemma3ForCausalLM``'s forward over a slot KV cache (see the module docstring).

    Not thread-safe: one thread (the engine's loop) drives it. Every method runs under
    ``torch.inference_mode``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_slots: int,
        max_len: int,
        kv_dtype: torch.dtype | None = None,
        quantize: str | None = None,
    ):
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', not {quantize!r}")
        config = model.config
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("bidirectional-attention Gemma-3 is not a causal decoder")
        inner = model.model
        fused = nn.ModuleList()
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _fuse(attn, ("q_proj", "k_proj", "v_proj"), quantize)
            fused.append(nn.ModuleList([qkv, _fuse(mlp, ("gate_proj", "up_proj"), quantize)]))
        self.dtype = inner.embed_tokens.weight.dtype
        if quantize == "int8":
            quantize_int8(inner)  # the decoder stack's projections
            _quantize_output(model)
        self.embed_weight = inner.embed_tokens.weight.detach()
        # HF multiplies by a float32 scalar cast to the weight dtype; the same rounding here
        self.embed_scale = inner.embed_tokens.embed_scale.detach().to(self.dtype)
        self.device = self.embed_weight.device
        self.config = config
        self.hidden = config.hidden_size
        self.vocab_size = config.vocab_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.window = config.sliding_window
        self.attn_softcap = config.attn_logit_softcapping
        self.final_softcap = config.final_logit_softcapping
        self.layer_types = list(config.layer_types[: config.num_hidden_layers])
        self.layers = [
            _Layer(m, t, f) for m, t, f in zip(inner.layers, self.layer_types, fused, strict=True)
        ]
        self.final_norm = _Norm(inner.norm)
        self.lm_head = model.lm_head
        self.act = ACT2FN[config.hidden_activation]
        rotary = inner.rotary_emb
        self.rope = {
            t: _rope_tables(
                getattr(rotary, f"{t}_inv_freq"), getattr(rotary, f"{t}_attention_scaling"), max_len
            )
            for t in set(self.layer_types)
        }
        self.max_slots, self.max_len = max_slots, max_len
        self.kv_dtype = kv_dtype or self.dtype
        self.lengths = [0] * max_slots
        self.kv = self._zeros(min(max_len, 64))

    # -- cache management ------------------------------------------------------------------

    def _zeros(self, capacity: int) -> torch.Tensor:
        # zeros, not empty: masked positions still enter SDPA's weights @ V, and 0 * NaN is NaN
        shape = (len(self.layers), 2, self.max_slots, self.kv_heads, capacity, self.head_dim)
        return torch.zeros(shape, dtype=self.kv_dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    def _reserve(self, length: int) -> None:
        """Grow the cache's time axis (doubling) so that ``length`` positions fit."""
        if length > self.max_len:
            raise ValueError(f"sequence of {length} positions exceeds max_len={self.max_len}")
        if length <= self.capacity:
            return
        capacity = self.capacity
        while capacity < length:
            capacity = min(2 * capacity, self.max_len)
        grown = self._zeros(capacity)
        grown[..., : self.capacity, :] = self.kv
        self.kv = grown

    def reset(self, slot: int) -> None:
        """Forget the slot's sequence (its stale KV stays, masked out, until overwritten)."""
        self.lengths[slot] = 0

    @torch.inference_mode()
    def copy_slot(self, src: int, dst: int, n: int) -> None:
        """Make ``dst`` hold the first ``n`` positions of ``src`` (a shared prefix)."""
        if n > self.lengths[src]:
            raise ValueError(f"slot {src} holds {self.lengths[src]} positions, not {n}")
        self.kv[:, :, dst, :, :n] = self.kv[:, :, src, :, :n]
        self.lengths[dst] = n

    @torch.inference_mode()
    def read(self, slot: int, n: int | None = None) -> torch.Tensor:
        """A copy of the slot's first ``n`` (default: all) positions' KV, slot-independent:
        ``[layers, 2, kv_heads, n, head_dim]`` (what the prefix cache stores)."""
        n = self.lengths[slot] if n is None else n
        return self.kv[:, :, slot, :, :n].clone()

    @torch.inference_mode()
    def write(self, slot: int, kv: torch.Tensor) -> None:
        """Set the slot to the KV that ``read`` returned (its length becomes ``kv``'s)."""
        n = kv.shape[3]
        self._reserve(n)
        self.kv[:, :, slot, :, :n] = kv
        self.lengths[slot] = n

    # -- forward ---------------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Token embeddings as HF's ``Gemma3TextScaledWordEmbedding`` gives them (scaled by
        sqrt(hidden) in the weight dtype). Spliced-in span embeddings are used unscaled."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        return F.embedding(ids, self.embed_weight).to(self.dtype) * self.embed_scale

    @torch.inference_mode()
    def prefill(self, slot: int, embeds: torch.Tensor) -> torch.Tensor:
        """Append ``embeds`` (``[n, hidden]``, positions ``len .. len + n - 1``) to ``slot``;
        return the logits of the last position only (``[vocab]``)."""
        n = embeds.shape[0]
        start = self.lengths[slot]
        end = start + n
        self._reserve(end)
        pos = torch.arange(start, end, device=self.device)
        kv_pos = torch.arange(end, device=self.device)
        causal = kv_pos[None, :] <= pos[:, None]
        masks = {FULL: causal, SLIDING: causal & (kv_pos[None, :] > pos[:, None] - self.window)}
        groups = self.heads // self.kv_heads
        x = embeds.to(self.dtype)[None]  # [1, n, hidden]
        for i, layer in enumerate(self.layers):
            cos, sin = (t[start:end] for t in self.rope[layer.layer_type])
            q, k, v = layer.qkv(layer.norms[0](x)).split(layer.qkv_sizes, dim=-1)
            q = layer.q_norm(q.view(1, n, self.heads, self.head_dim)).transpose(1, 2)
            k = layer.k_norm(k.view(1, n, self.kv_heads, self.head_dim)).transpose(1, 2)
            v = v.view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            self.kv[i, 0, slot, :, start:end] = k[0]
            self.kv[i, 1, slot, :, start:end] = v[0]
            keys = self.kv[i, 0, slot : slot + 1, :, :end].to(q.dtype)
            values = self.kv[i, 1, slot : slot + 1, :, :end].to(q.dtype)
            # grouped-query attention without copying K / V: a KV head's query heads become
            # extra query rows ([1, kv_heads, groups * n, head_dim]), the mask repeated to match
            q = q.reshape(1, self.kv_heads, groups * n, self.head_dim)
            mask = masks[layer.layer_type].repeat(groups, 1)
            out = self._attend(q, keys, values, mask)  # [1, kv_heads, groups * n, head_dim]
            out = out.reshape(1, self.heads, n, self.head_dim).transpose(1, 2).reshape(1, n, -1)
            x = self._finish_layer(layer, x, out)
        self.lengths[slot] = end
        return self._logits(x[0, -1:])[0]

    @torch.inference_mode()
    def decode(self, slots: list[int], embeds: torch.Tensor) -> torch.Tensor:
        """Append one position to each slot (``embeds``: ``[B, hidden]``, row ``b`` for
        ``slots[b]``) in one batched forward; return ``[B, vocab]`` logits.

        Consecutive slots (what the engine hands out first) read the cache as a view; any
        other set is gathered."""
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in {slots}")
        b = len(slots)
        lengths = [self.lengths[s] for s in slots]
        end = max(lengths) + 1
        self._reserve(end)
        contiguous = slots == list(range(slots[0], slots[0] + b))
        rows = (
            slice(slots[0], slots[0] + b) if contiguous else torch.tensor(slots, device=self.device)
        )
        slot_t = torch.tensor(slots, device=self.device)
        pos = torch.tensor(lengths, device=self.device)
        kv_pos = torch.arange(end, device=self.device)
        causal = kv_pos[None, :] <= pos[:, None]  # [B, end]
        masks = {
            FULL: causal[:, None, None, :],
            SLIDING: (causal & (kv_pos[None, :] > pos[:, None] - self.window))[:, None, None, :],
        }
        rope = {t: (cos[pos][:, None], sin[pos][:, None]) for t, (cos, sin) in self.rope.items()}
        groups = self.heads // self.kv_heads
        x = embeds.to(self.dtype)  # [B, hidden]
        for i, layer in enumerate(self.layers):
            cos, sin = rope[layer.layer_type]
            q, k, v = layer.qkv(layer.norms[0](x)).split(layer.qkv_sizes, dim=-1)
            q = layer.q_norm(q.view(b, self.heads, self.head_dim))
            k = layer.k_norm(k.view(b, self.kv_heads, self.head_dim))
            v = v.view(b, self.kv_heads, self.head_dim)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            self.kv[i, 0][slot_t, :, pos] = k.to(self.kv_dtype)
            self.kv[i, 1][slot_t, :, pos] = v.to(self.kv_dtype)
            keys = self.kv[i, 0][rows, :, :end].to(q.dtype)
            values = self.kv[i, 1][rows, :, :end].to(q.dtype)
            q = q.view(b, self.kv_heads, groups, self.head_dim)  # see prefill's GQA note
            out = self._attend(q, keys, values, masks[layer.layer_type])
            x = self._finish_layer(layer, x, out.reshape(b, -1))
        for s, n in zip(slots, lengths, strict=True):
            self.lengths[s] = n + 1
        return self._logits(x)

    def _attend(self, q, keys, values, mask) -> torch.Tensor:
        if self.attn_softcap is None:
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self.scaling
            )
        scores = torch.tanh(q @ keys.transpose(-1, -2) * (self.scaling / self.attn_softcap))
        scores = (scores * self.attn_softcap).masked_fill(~mask, -math.inf)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ values

    def _finish_layer(self, layer: _Layer, x, attn_out) -> torch.Tensor:
        """o_proj, the residuals and the MLP: what follows attention in a Gemma-3 layer."""
        x = x + layer.norms[1](layer.o(attn_out))
        gate, up = layer.gate_up(layer.norms[2](x)).split(layer.mlp_sizes, dim=-1)
        return x + layer.norms[3](layer.down(self.act(gate) * up))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.final_norm(x))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
