"""One decoding step of a Llama-family model from its own weights, in a fraction of transformers' operator calls.

A decoded token is a (B, 1, D) tensor, and at that size a step of transformers' Llama is mostly dispatch: about
45 operators a layer (seven per norm, twelve for rotary, one matmul per projection). This step runs the same
arithmetic in the same dtypes with fewer: q, k and v in one matmul, gate and up in one, rotary over queries
and keys at once, attention over the key/value heads without repeating them. The fused weights are held in the
dtype the step computes in: autocast's under autocast, where transformers would cast every frozen weight again
at every call. Frozen weights are fused once; trainable ones again at every generation (PPO changes them
between rollouts). LoRA adapters stay beside them, unmerged, as PEFT computes them (a bf16 weight would round a
young adapter's change away). Prefill stays transformers' forward: its (B, P, D) matmuls outweigh the calls.

`stepper(model)` gives the step for a model of a family it knows, else a step through transformers' forward,
so every model decodes the same way from the engine's side.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatrlhf.models import unwrap

FAMILIES = ("llama", "qwen2")  # RMSNorm, rotary, grouped-query attention, SwiGLU; qwen2 adds q/k/v biases
# model -> {its modules' ids: (signature, fused base weight and bias)}, kept while the model lives
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ForwardStep:
    """A decoding step through the model's own forward (any architecture); a kept trunk is seen by the
    generation's hook on that layer, so `trunk` stays None."""

    trunk = None

    def __init__(self, model, cache_key: str):
        self.model, self.key = model, cache_key

    def __call__(self, tokens, attention, position, cache) -> torch.Tensor:
        out = self.model(input_ids=tokens[:, None], attention_mask=attention, position_ids=position,
                         use_cache=True, **{self.key: cache})  # fmt: skip
        return out.logits[:, -1, :]


@dataclass
class _Linear:
    """A (possibly fused) projection: y = x W^T + b + ((x A^T) B^T), the last term the LoRA adapters' (their
    scaling folded into B), B block-diagonal where several adapted projections were fused."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    lora: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora is not None:
            y = y + F.linear(F.linear(x, self.lora[0]), self.lora[1])
        return y


@dataclass
class _Layer:
    norm_in: torch.Tensor
    qkv: _Linear
    o: _Linear
    norm_post: torch.Tensor
    gate_up: _Linear
    down: _Linear


@dataclass
class _Weights:
    layers: list[_Layer]
    norm: torch.Tensor
    head: _Linear


class LeanStep:
    """The decoding step of a Llama-family model in few operators; the hidden states entering decoder layer
    `trunk_layer` (when > 0) are left in `self.trunk` after each call."""

    def __init__(self, model, weights: _Weights, trunk_layer: int = 0):
        base = unwrap(model)
        config = base.config
        self.backbone = getattr(base, base.base_model_prefix)
        self.weights, self.trunk_layer, self.trunk = weights, trunk_layer, None
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # transformers' RMSNorm (in fp32, back to the input's dtype, then the weight), its core one operator
        return weight * torch.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)

    def __call__(self, tokens, attention, position, cache) -> torch.Tensor:
        h = self.backbone.embed_tokens(tokens[:, None])  # (B, 1, D)
        cos, sin = self.backbone.rotary_emb(h, position)  # (B, 1, d) each, in h's dtype
        cos, sin = cos[:, None], sin[:, None]
        mask = attention.bool()[:, None, None, :]  # (B, 1, 1, W)
        batch, d, heads, kv = h.shape[0], self.head_dim, self.heads, self.kv_heads
        half = d // 2
        for i, layer in enumerate(self.weights.layers):
            if i == self.trunk_layer and i:
                self.trunk = h
            qkv = layer.qkv(self._norm(h, layer.norm_in))  # (B, 1, (H + 2 Hkv) d)
            qk = qkv[..., : (heads + kv) * d].view(batch, heads + kv, 1, d)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            v = qkv[..., (heads + kv) * d :].view(batch, kv, 1, d)
            # rotary leaves queries and keys in the residual's dtype (fp32 under autocast), which attention
            # casts to the compute dtype (v's): cast once here, and the cache holds keys attention can read
            # as they are instead of casting the whole cache again at every step
            qk = qk.to(v.dtype)
            keys, values = cache.layers[i].update(qk[:, heads:], v)
            # one query token: its heads grouped under their key/value head, no repeated keys
            q = qk[:, :heads].reshape(batch, kv, heads // kv, d)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=d**-0.5)
            h = h + layer.o(out.reshape(batch, 1, heads * d))
            gate, up = layer.gate_up(self._norm(h, layer.norm_post)).chunk(2, dim=-1)
            h = h + layer.down(F.silu(gate) * up)
        return self.weights.head(self._norm(h, self.weights.norm))[:, -1, :]


def stepper(model, cache_key: str, trunk_layer: int = 0):
    """The decoding step for `model` as it is now (call again after its weights change): the lean step where
    the family and its adapters allow, else the model's forward."""
    base = unwrap(model)
    if base.config.model_type not in FAMILIES or not _plain_layers(base.config) or not _plain_adapters(model):
        return ForwardStep(model, cache_key)
    kind = next(model.parameters()).device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else base.dtype
    return LeanStep(model, _prepare(model, dtype, _PREPARED.setdefault(model, {})), trunk_layer)


def _plain_layers(config) -> bool:
    """Every layer full attention with SiLU gating (no sliding window, no other activation)."""
    types = getattr(config, "layer_types", None) or ["full_attention"]
    window = getattr(config, "use_sliding_window", False)
    return config.hidden_act == "silu" and not window and set(types) == {"full_attention"}


def _plain_adapters(model) -> bool:
    """No adapters, or plain unmerged LoRA (no DoRA, no bias) with one active adapter and no dropout in use;
    an adapter of another kind (a wrapped layer without `lora_A`) is not."""
    for m in model.modules():
        if getattr(m, "lora_A", None) is None:
            if hasattr(m, "base_layer"):
                return False
            continue
        if not len(m.lora_A):
            continue
        active = m.active_adapters
        if m.merged or len(active) != 1 or getattr(m, "use_dora", {}).get(active[0], False):
            return False
        if m.lora_B[active[0]].bias is not None:
            return False
        if m.training and not isinstance(m.lora_dropout[active[0]], torch.nn.Identity):
            return False
    return True


def _fuse(modules, dtype, held: dict) -> _Linear:
    """One projection for `modules` side by side (their outputs concatenated), in `dtype`. The fused copy of
    the base weights is kept in `held` and used again while they are the same tensors, frozen and not
    changed in place; trainable ones are copied every time (a fused optimizer step leaves `_version` as it
    was), as are the adapters (small)."""
    bases = [getattr(m, "base_layer", m) for m in modules]
    params = [p for b in bases for p in (b.weight, b.bias) if p is not None]
    signature = (dtype, tuple((id(p), p._version) for p in params))
    key = tuple(id(b) for b in bases)
    if key in held and held[key][0] == signature and not any(p.requires_grad for p in params):
        weight, bias = held[key][1]
    else:
        # one module's weight is used as it is where the dtype matches (no copy of the fp32 LM head)
        weight = (bases[0].weight if len(bases) == 1 else torch.cat([b.weight for b in bases])).to(dtype)
        bias = None if bases[0].bias is None else torch.cat([b.bias for b in bases]).to(dtype)
        held[key] = (signature, (weight, bias))
    return _Linear(weight, bias, _adapters(modules, [b.weight.shape[0] for b in bases], weight))


def _adapters(modules, rows: list[int], weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The LoRA adapters of `modules` as one (A, B) pair: A stacked, B block-diagonal with each adapter's
    scaling folded in, zeros where a module has none; None when none has one switched on."""
    downs, ups = [], []
    for m in modules:
        lora = getattr(m, "lora_A", None)
        on = lora is not None and len(lora) and not m.disable_adapters
        name = m.active_adapters[0] if on else None
        downs.append(m.lora_A[name].weight if on else None)
        ups.append(m.lora_B[name].weight * m.scaling[name] if on else None)
    if all(a is None for a in downs):
        return None
    up = weight.new_zeros(sum(rows), sum(a.shape[0] for a in downs if a is not None))
    row = col = 0
    for a, b, n in zip(downs, ups, rows):
        if a is not None:
            up[row : row + n, col : col + a.shape[0]] = b
            col += a.shape[0]
        row += n
    return torch.cat([a for a in downs if a is not None]).to(weight.dtype), up


@torch.no_grad()
def _prepare(model, dtype, held: dict) -> _Weights:
    base = unwrap(model)
    backbone = getattr(base, base.base_model_prefix)
    layers = []
    for layer in backbone.layers:
        att, mlp = layer.self_attn, layer.mlp
        layers.append(
            _Layer(
                norm_in=layer.input_layernorm.weight,
                qkv=_fuse([att.q_proj, att.k_proj, att.v_proj], dtype, held),
                o=_fuse([att.o_proj], dtype, held),
                norm_post=layer.post_attention_layernorm.weight,
                gate_up=_fuse([mlp.gate_proj, mlp.up_proj], dtype, held),
                down=_fuse([mlp.down_proj], dtype, held),
            )
        )
    return _Weights(layers, backbone.norm.weight, _fuse([base.lm_head], dtype, held))
