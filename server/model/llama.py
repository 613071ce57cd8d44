"""Our own forward for the Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2).

Tokens of a step are flattened: `input_ids [num_tokens]`, `positions [num_tokens]`. Keys and values
go to a paged KV cache (server.engine.kv_cache); `StepContext` carries where, and which adapter
slot each token uses. q/k/v and gate/up are fused into one linear each (fewer kernel launches);
LoRA adapters still target q, k, v, gate and up separately through output slices.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from server.kernels.attention.attention_ops import paged_decode_attention, prefill_attention
from server.kernels.attention.rotary_attention import rotary_decode_attention
from server.kernels.glue import glue_ops
from server.kernels.lora import act_shrink
from server.kernels.split_sums import SplitSums
from server.model.lora import LoraContext, LoraLinear
from server.model.quant import make_linear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# qkv_proj and gate_up_proj hand their split-K partials to the glue kernel that reads them (server.kernels.split_sums);
# LORAPLEX_DEFER_SPLIT_SUMS=0 runs csrc's sum kernel instead (A/B timing). From DEFER_MIN_ROWS rows (H200, 8B engine
# bench, one run each): one row was left to the sum kernel in the fourteenth session (3.317 ms of kernels deferred
# against 3.292, when qkv's 16 planes went to the rotary kernel too); with qkv on nf4_gemv (no partials) and
# silu_mul one element a thread under 8 rows, deferring at one row too gave batch 1 298.6 against 295.2 tokens/s
# (twenty-first session). LORAPLEX_DEFER_MIN_ROWS=2 keeps one-row steps on the sum kernel.
DEFER_SPLIT_SUMS = os.environ.get("LORAPLEX_DEFER_SPLIT_SUMS", "1") == "1"
DEFER_MIN_ROWS = int(os.environ.get("LORAPLEX_DEFER_MIN_ROWS", "1"))


# o_proj and down_proj hand theirs to the residual add + norm that reads their output (one program a row sums
# every plane of its row: 16 planes of the 8B shape's 4,096-wide row are 256 KB for one SM, why these two were left
# to the sum kernel in the fourteenth session), with LORAPLEX_NORM_SPLIT_SUMS=1 from NORM_SUMS_MIN_ROWS rows: at the
# 1B shape's 32 rows the sum kernel takes 32 launches a step (52 us of its 1.16 ms, twenty-second session's
# profile). Off: the twenty-third session's A/B (1B batch-32 profile, H200) put the step at 1.168 ms against 1.145
# with the sum kernel; under PDL the 8B merged batch-32 step took 4.250 ms against 3.812 (forty-fourth session, H100).
# Also measured slower and removed (design in 765e5c3 and 2225127): the norm over partials as a thread-block cluster of
# 8 blocks a row, each summing an eighth of the row's columns, the sum of squares added across the cluster (H100, 8B
# merged batch-32 step, forty-ninth session: 4.131 ms against 3.724 at 128 threads a block, 3.892 against 3.793 at
# 512). Each sum + norm ended 1.3-1.6 us later than the sum kernel then the norm, and the resident grid after it ran
# 3-4 us slower: the norm's blocks sit on every SM when that grid's one block an SM launches
# (bench/results/2026-12-07-nvidia-h100-80gb-hbm3-8b-b32-merged-profile-s49-cluster-norm-512.json).
NORM_SPLIT_SUMS = os.environ.get("LORAPLEX_NORM_SPLIT_SUMS", "0") == "1"
NORM_SUMS_MIN_ROWS = int(os.environ.get("LORAPLEX_NORM_SUMS_MIN_ROWS", "8"))


def defer_sums(x: torch.Tensor) -> bool:
    """Whether a projection of x [T, in] hands its split-K partials to the glue kernel that reads its output."""
    return DEFER_SPLIT_SUMS and x.shape[0] >= DEFER_MIN_ROWS


def defer_norm_sums(x: torch.Tensor) -> bool:
    """Whether o_proj or down_proj of x [T, in] hands its split-K partials to the residual add + norm after it."""
    return NORM_SPLIT_SUMS and x.shape[0] >= NORM_SUMS_MIN_ROWS


class UnsupportedModelError(ValueError):
    """The checkpoint is not a Llama-family model we implement."""


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts our forward needs, read from a transformers config."""

    model_type: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    hf_config: Any = field(compare=False, repr=False)

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        if hf.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {hf.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
            )
        heads = hf.num_attention_heads
        return cls(
            model_type=hf.model_type,
            architecture=(getattr(hf, "architectures", None) or [f"{hf.model_type}ForCausalLM"])[0],
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            hf_config=hf,
        )

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-targetable projection: the adapter store's
        BaseModelSpec holds the one formula, so the model and adapter validation cannot disagree."""
        from adapters_store import BaseModelSpec

        return BaseModelSpec.from_hf_config(self.hf_config).module_shapes


@dataclass
class PrefillSeq:
    """One sequence's chunk inside a prefill step (host-side facts, the step is eager)."""

    q_start: int  # first token of this chunk in the flattened batch
    q_len: int  # tokens in this chunk
    ctx_len: int  # tokens in the cache after this chunk (prefix + chunk)
    block_table: torch.Tensor  # [num_blocks] int64 on device
    block_ids: list[int] | None = None  # the same on the host, when the caller has it (saves a sync)


@dataclass
class StepContext:
    """Per-step metadata: where K/V go and how attention and LoRA read them."""

    is_prefill: bool
    slot_mapping: torch.Tensor  # [num_tokens] int64 flat cache index, -1 = do not write
    prefill_seqs: list[PrefillSeq] = field(default_factory=list)
    # Optional: fresh sequences (no cached prefix) of equal length, batched into one attention call
    # each: [num_seqs, length] token rows. When set, prefill_seqs only needs the other sequences.
    fresh_groups: list[torch.Tensor] | None = None
    block_tables: torch.Tensor | None = None  # [batch, max_blocks] int32 (decode)
    context_lens: torch.Tensor | None = None  # [batch] int32 (decode), 0 = padding row
    # Decode rows that each read only their own new k/v (one token a row, no prompt chunk riding the step): the
    # attention kernel may rotate and write them itself (rotary_attention.rotary_decode_attention)
    rows_read_own_kv: bool = False
    lora: LoraContext | None = None
    memo: dict = field(default_factory=dict)  # per-step values the layers share (attention metadata)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as transformers does."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:  # Qwen3's per-head q/k norms: [T, heads, D]
            return glue_ops.rmsnorm_reference(x, self.weight, self.eps)
        return glue_ops.rmsnorm(x, self.weight, self.eps)

    def add_forward(self, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, norm(h + delta)): the residual add fused into this norm."""
        return glue_ops.add_rmsnorm(h, delta, self.weight, self.eps)

    def embed_forward(self, ids: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(table[ids], norm(table[ids])): the embedding lookup fused into this norm."""
        return glue_ops.embed_rmsnorm(ids, table, self.weight, self.eps)


def rotary_tables(config: ModelConfig, max_positions: int, device: torch.device) -> torch.Tensor:
    """cos/sin for every position, honouring the config's rope scaling: [max_positions, 2, head_dim]."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = config.hf_config
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        dim = config.head_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float), inv_freq.float())
    emb = torch.cat([freqs, freqs], dim=-1)
    return torch.stack([emb.cos() * scaling, emb.sin() * scaling], dim=1).to(device)


class Attention(nn.Module):
    """GQA attention over the paged cache, with fused qkv and optional Qwen3 q/k norms."""

    def __init__(self, config: ModelConfig, qkv: LoraLinear, o: LoraLinear, q_norm, k_norm):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.qkv_proj, self.o_proj = qkv, o
        self.q_norm, self.k_norm = q_norm, k_norm
        self.scale = self.head_dim**-0.5

    def forward(self, x, rope, ctx: StepContext, k_cache, v_cache) -> torch.Tensor:
        if self.q_norm is None:  # the rotary kernel sums the projection's split-K partials (split_sums)
            qkv = self.qkv_proj(x, ctx.lora, defer_sum=defer_sums(x))
            if ctx.rows_read_own_kv:
                out = rotary_decode_attention(qkv, self.num_heads, self.num_kv_heads, self.head_dim, rope, k_cache,
                                              v_cache, ctx.slot_mapping, ctx.block_tables, ctx.context_lens,
                                              self.scale)
                return self._output(out, ctx)
            q, k, v = glue_ops.qkv_rotary_write_kv(qkv, self.num_heads, self.num_kv_heads, self.head_dim, rope,
                                                   k_cache, v_cache, ctx.slot_mapping)
        else:
            q, k, v = glue_ops.split_qkv(self.qkv_proj(x, ctx.lora), self.num_heads, self.num_kv_heads, self.head_dim)
            q, k = glue_ops.rotary_write_kv(self.q_norm(q), self.k_norm(k), v, rope, k_cache, v_cache,
                                            ctx.slot_mapping)
        if ctx.is_prefill:
            out = self._prefill_attention(q, k, v, ctx, k_cache, v_cache)
        else:
            out = paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, self.scale)
        return self._output(out, ctx)

    def _output(self, out: torch.Tensor, ctx: StepContext) -> torch.Tensor | SplitSums:
        """o_proj of the attention [T, Hq, D]: maybe its split-K partials, which the next residual add sums."""
        out = out.reshape(-1, self.num_heads * self.head_dim)
        return self.o_proj(out, ctx.lora, defer_sum=defer_norm_sums(out))

    def _prefill_attention(self, q, k, v, ctx: StepContext, k_cache, v_cache) -> torch.Tensor:
        return prefill_attention(q, k, v, k_cache, v_cache, ctx.prefill_seqs, ctx.fresh_groups, self.scale,
                                 ctx.memo)


class MLP(nn.Module):
    """SwiGLU with fused gate/up."""

    def __init__(self, gate_up: LoraLinear, down: LoraLinear):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up, down

    def forward(self, x, lora: LoraContext | None, decode: bool = False) -> torch.Tensor:
        # silu_mul sums gate_up's split-K partials as it reads them (split_sums), and adds a pending LoRA delta
        # (pending_lora); in a decode step under LORAPLEX_LORA_SILU_SHRINK it computes down_proj's LoRA shrink
        # (act_shrink)
        shrink = act_shrink.shrink_ahead(self.down_proj, lora, x.shape[0], x.device) if decode else None
        gate_up = self.gate_up_proj(x, lora, defer_sum=defer_sums(x), defer_delta=True)
        act_shrink.ready(shrink)
        act = glue_ops.silu_mul(gate_up, shrink=shrink)
        h = shrink.h if shrink is not None else None  # the next residual add sums down's partials
        return self.down_proj(act, lora, defer_sum=defer_norm_sums(act), h=h)


class DecoderLayer(nn.Module):
    def __init__(self, attn: Attention, mlp: MLP, input_norm: RMSNorm, post_norm: RMSNorm):
        super().__init__()
        self.self_attn, self.mlp = attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_norm, post_norm

    def forward(self, h, pending, rope, ctx: StepContext, k_cache, v_cache, x=None):
        """h: the residual stream; pending: the previous layer's MLP output not yet added to it (None
        before the first layer). Returns (h, this layer's MLP output): each residual add is fused into
        the norm that follows it. x: this layer's normed input when the caller has it (the first layer's, from
        the norm that gathered the embeddings)."""
        if x is None:
            h, x = (h, self.input_layernorm(h)) if pending is None else self.input_layernorm.add_forward(h, pending)
        h, x = self.post_attention_layernorm.add_forward(h, self.self_attn(x, rope, ctx, k_cache, v_cache))
        return h, self.mlp(x, ctx.lora, decode=not ctx.is_prefill)


class CausalLM(nn.Module):
    """Embeddings, decoder layers, final norm and a 16-bit LM head."""

    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[DecoderLayer], norm: RMSNorm,
                 head: torch.Tensor | None):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Parameter(embed, requires_grad=False)  # [vocab, hidden]
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = None if head is None else nn.Parameter(head, requires_grad=False)  # [vocab, hidden]
        self.rope = rotary_tables(config, config.max_position_embeddings, embed.device)
        self.kv_cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # set by the engine

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def lora_linears(self) -> list[tuple[int, LoraLinear]]:
        """(layer index, layer) for every LoRA-capable linear, in a fixed order."""
        found = []
        for i, layer in enumerate(self.layers):
            a, m = layer.self_attn, layer.mlp
            found += [(i, a.qkv_proj), (i, a.o_proj), (i, m.gate_up_proj), (i, m.down_proj)]
        return found

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """input_ids/positions [num_tokens] -> final hidden states [num_tokens, hidden]."""
        h, x = self.layers[0].input_layernorm.embed_forward(input_ids, self.embed_tokens)  # one launch on CUDA
        rope = self.rope[positions]
        pending = None
        for index, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, self.kv_cache, strict=True)):
            h, pending = layer(h, pending, rope, ctx, k_cache, v_cache, x if index == 0 else None)
        return self.norm(h) if pending is None else self.norm.add_forward(h, pending)[1]

    def compute_logits(self, hidden: torch.Tensor, *, float32: bool = True) -> torch.Tensor:
        """hidden [n, hidden] -> logits [n, vocab]: float32, or with float32=False the model's dtype (the sampler
        casts them only for rows that need more than an argmax)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        logits = F.linear(hidden, head)
        return logits.float() if float32 else logits

    @classmethod
    def from_weights(cls, config: ModelConfig, w: dict[str, torch.Tensor], *, dtype: torch.dtype,
                     device: torch.device, quantize: bool) -> CausalLM:
        """Build from an HF state dict (names as in LlamaForCausalLM), quantizing linears if asked."""

        def take(name):
            return w.pop(name).to(device)

        def take_opt(name):
            return w.pop(name).to(device) if name in w else None

        def linear(prefix, names, shapes):
            weight = torch.cat([take(f"{prefix}.{n}.weight") for n in names])
            biases = [take_opt(f"{prefix}.{n}.bias") for n in names]
            bias = None if biases[0] is None else torch.cat(biases)
            base = make_linear(weight, bias, dtype, quantize)
            return LoraLinear(base, names, [shapes[n][1] for n in names])

        shapes = config.module_shapes()
        layers = []
        # A bar on a terminal (quantizing an 8B model takes a while); nothing in logs or pipes.
        for i in tqdm(range(config.num_layers), desc="quantizing" if quantize else "building", unit="layer",
                      disable=not sys.stderr.isatty()):
            p = f"model.layers.{i}"
            qn, kn = take_opt(f"{p}.self_attn.q_norm.weight"), take_opt(f"{p}.self_attn.k_norm.weight")
            attn = Attention(
                config,
                linear(f"{p}.self_attn", ("q_proj", "k_proj", "v_proj"), shapes),
                linear(f"{p}.self_attn", ("o_proj",), shapes),
                None if qn is None else RMSNorm(qn.to(dtype), config.rms_norm_eps),
                None if kn is None else RMSNorm(kn.to(dtype), config.rms_norm_eps),
            )
            mlp = MLP(linear(f"{p}.mlp", ("gate_proj", "up_proj"), shapes), linear(f"{p}.mlp", ("down_proj",), shapes))
            layers.append(DecoderLayer(
                attn, mlp,
                RMSNorm(take(f"{p}.input_layernorm.weight").to(dtype), config.rms_norm_eps),
                RMSNorm(take(f"{p}.post_attention_layernorm.weight").to(dtype), config.rms_norm_eps),
            ))
        embed = take("model.embed_tokens.weight").to(dtype)
        head = take_opt("lm_head.weight")
        if config.tie_word_embeddings:
            head = None
        norm = RMSNorm(take("model.norm.weight").to(dtype), config.rms_norm_eps)
        return cls(config, embed, layers, norm, None if head is None else head.to(dtype))
