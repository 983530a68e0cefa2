"""The declarative Hugging Face <-> ditto-jax tensor table, one rule list per family.

A rule maps one HF tensor name template to one of our parameters. ``{layer}`` in the template marks a
per-layer tensor: it goes into (comes out of) slice ``layer`` of our stacked ``[num_layers, ...]`` parameter.
``transpose`` marks a ``torch.nn.Linear`` weight (``[out, in]`` in HF, ``[in, out]`` here). Nothing else
differs: our module names mirror HF's, so import and export are this table read in either direction.
"""

from __future__ import annotations

import dataclasses
import re

from ditto_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One HF tensor (template) <-> one of our parameters (dotted path in the nnx state)."""

    hf: str
    ours: str
    transpose: bool = False
    when: str | None = None  # a ModelConfig condition: "untied" (separate lm_head) — None means always

    @property
    def stacked(self) -> bool:
        """Whether the HF tensor is one layer of our stacked parameter."""
        return "{layer}" in self.hf

    def pattern(self) -> re.Pattern[str]:
        """Regex matching the HF names of this rule (group ``layer`` for per-layer tensors)."""
        return re.compile(re.escape(self.hf).replace(r"\{layer\}", r"(?P<layer>\d+)") + "$")


def _linear(hf_module: str, ours: str) -> TensorRule:
    return TensorRule(f"model.layers.{{layer}}.{hf_module}.weight", f"layers.{ours}.kernel", transpose=True)


def _bias(hf_module: str, ours: str) -> TensorRule:
    return TensorRule(f"model.layers.{{layer}}.{hf_module}.bias", f"layers.{ours}.bias")


def _norm(hf_module: str, ours: str) -> TensorRule:
    return TensorRule(f"model.layers.{{layer}}.{hf_module}.weight", f"layers.{ours}.scale")


BASE = (
    TensorRule("model.embed_tokens.weight", "embed_tokens"),
    TensorRule("model.norm.weight", "norm"),
    TensorRule("lm_head.weight", "lm_head", transpose=True, when="untied"),
    _norm("input_layernorm", "input_layernorm"),
    _norm("post_attention_layernorm", "post_attention_layernorm"),
    _linear("self_attn.q_proj", "self_attn.q_proj"),
    _linear("self_attn.k_proj", "self_attn.k_proj"),
    _linear("self_attn.v_proj", "self_attn.v_proj"),
    _linear("self_attn.o_proj", "self_attn.o_proj"),
    _linear("mlp.gate_proj", "mlp.gate_proj"),
    _linear("mlp.up_proj", "mlp.up_proj"),
    _linear("mlp.down_proj", "mlp.down_proj"),
)
QKV_BIAS = (
    _bias("self_attn.q_proj", "self_attn.q_proj"),
    _bias("self_attn.k_proj", "self_attn.k_proj"),
    _bias("self_attn.v_proj", "self_attn.v_proj"),
)
QK_NORM = (
    _norm("self_attn.q_norm", "self_attn.q_norm"),
    _norm("self_attn.k_norm", "self_attn.k_norm"),
)

FAMILY_RULES: dict[str, tuple[TensorRule, ...]] = {
    "llama": BASE,
    "mistral": BASE,
    "qwen2": BASE + QKV_BIAS,
    "qwen3": BASE + QK_NORM,
}

# Non-parameter buffers some checkpoints carry; skipped on import (and counted).
IGNORED = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),)


def rules_for(cfg: ModelConfig) -> tuple[TensorRule, ...]:
    """The rules that apply to ``cfg`` (the lm_head rule only for untied embeddings)."""
    return tuple(r for r in FAMILY_RULES[cfg.architecture] if r.when != "untied" or not cfg.tie_word_embeddings)


def hf_names(rule: TensorRule, cfg: ModelConfig) -> list[str]:
    """Every HF tensor name of ``rule`` (one per layer for a stacked rule)."""
    if rule.stacked:
        return [rule.hf.format(layer=i) for i in range(cfg.num_layers)]
    return [rule.hf]


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[TensorRule, int | None]]:
    """HF name -> (rule, layer index or None) for every tensor a checkpoint of ``cfg`` must hold."""
    out: dict[str, tuple[TensorRule, int | None]] = {}
    for rule in rules_for(cfg):
        for i, name in enumerate(hf_names(rule, cfg)):
            out[name] = (rule, i if rule.stacked else None)
    return out


def hf_shape(our_shape: tuple[int, ...], rule: TensorRule) -> tuple[int, ...]:
    """The HF tensor shape that fills one (layer) slice of our parameter of ``our_shape``."""
    shape = our_shape[1:] if rule.stacked else our_shape
    return tuple(reversed(shape)) if rule.transpose else tuple(shape)
