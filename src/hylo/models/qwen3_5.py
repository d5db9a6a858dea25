"""The Qwen3.5 text model (dense and MoE), reading like the reference: embed → layers → norm → lm_head.

Module attribute names follow the checkpoint's module path (model.layers.N.linear_attn ...), so every
declared part finds its tensor by `parent path + part key`.
"""

from __future__ import annotations

import torch
from torch import nn

from hylo.batch import Batch
from hylo.config import ModelConfig
from hylo.distributed import TPGroup
from hylo.kernels import Ops
from hylo.layers.attention import GatedAttention
from hylo.layers.embedding import LMHead, VocabEmbedding
from hylo.layers.gdn import GatedDeltaNet
from hylo.layers.mlp import MLP
from hylo.layers.moe import SparseMoE
from hylo.layers.norm import ResidualNorm
from hylo.state import CacheShapes, CacheTensors


class DecoderLayer(nn.Module):
    def __init__(self, cfg, index: int, moe: bool, tp: TPGroup, ops: Ops):
        super().__init__()
        owner = f"layers.{index}."
        self.is_linear = cfg.layer_types[index] == "linear_attention"
        self.input_layernorm = ResidualNorm("input_layernorm", cfg.hidden_size, cfg.rms_norm_eps, ops, tp)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg, tp, ops, owner + "linear_attn.")
        else:
            self.self_attn = GatedAttention(cfg, tp, ops, owner + "self_attn.")
        self.post_attention_layernorm = ResidualNorm("post_attention_layernorm", cfg.hidden_size, cfg.rms_norm_eps, ops, tp)
        self.mlp = SparseMoE(cfg, tp, ops, owner + "mlp.") if moe else MLP(cfg.hidden_size, cfg.intermediate_size, tp, ops, owner + "mlp.")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: Batch, state: tuple[torch.Tensor, ...]):
        """x: the previous layer's output as this rank's partial sum, residual: the stream before it (None at the first
        layer). Each sum, over the ranks and with the residual, is formed inside the next norm, one launch for all;
        returns (output, residual) the same way."""
        h, residual = self.input_layernorm(x, residual)
        h = self.linear_attn(h, batch, *state) if self.is_linear else self.self_attn(h, batch, *state)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class TextModel(nn.Module):
    def __init__(self, cfg, moe: bool, tp: TPGroup, ops: Ops):
        super().__init__()
        self.embed_tokens = VocabEmbedding("embed_tokens", cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, moe, tp, ops) for i in range(cfg.num_hidden_layers))
        self.norm = ResidualNorm("norm", cfg.hidden_size, cfg.rms_norm_eps, ops, tp)


class Qwen3_5ForCausalLM(nn.Module):
    """Dense or MoE, from either checkpoint layout (the loader maps `model.language_model.` onto `model.`)."""

    def __init__(self, config: ModelConfig, tp: TPGroup, ops: Ops):
        super().__init__()
        cfg = config.text
        self.config = config
        self.model = TextModel(cfg, config.is_moe, tp, ops)
        self.lm_head = LMHead(self.model.embed_tokens, config.tie_word_embeddings, tp)

    def forward(self, batch: Batch, caches: CacheTensors) -> torch.Tensor:
        """Hidden states after the final norm, for the tokens whose logits are needed: [sampled, hidden]."""
        x, residual = self.model.embed_tokens(batch.input_ids), None
        kv, conv, rec = iter(caches.kv), iter(caches.conv), iter(caches.recurrent)
        for layer in self.model.layers:
            state = (next(conv), next(rec)) if layer.is_linear else (next(kv),)
            x, residual = layer(x, residual, batch, state)
        rows = batch.logits_indices
        return self.model.norm(x[rows], residual[rows])[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def cache_shapes(self) -> CacheShapes:
        """This rank's per-block and per-slot state sizes, read off the layers as built."""
        layers = self.model.layers
        gdn = next((l.linear_attn for l in layers if l.is_linear), None)
        attn = next((l.self_attn for l in layers if not l.is_linear), None)
        cfg = self.config.text
        return CacheShapes(
            num_attention_layers=sum(not l.is_linear for l in layers),
            num_gdn_layers=sum(l.is_linear for l in layers),
            kv_heads=attn.qkv.local_sizes[1] // cfg.head_dim if attn else 0,
            head_dim=cfg.head_dim,
            conv_channels=gdn.in_proj.local_sizes[0] if gdn else 0,
            conv_width=cfg.linear_conv_kernel_dim - 1,
            value_heads=gdn.in_proj.local_sizes[2] if gdn else 0,  # in_proj_b: one row per value head
            k_dim=cfg.linear_key_head_dim,
            v_dim=cfg.linear_value_head_dim,
        )
