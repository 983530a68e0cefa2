"""Decoder configuration covering the Llama, Qwen2, Qwen3 and Mistral families."""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import pydantic

from ditto_jax.config import StrictModel, load_config

Architecture = Literal["llama", "qwen2", "qwen3", "mistral"]
DType = Literal["float32", "bfloat16", "float16"]
AttentionImpl = Literal["xla", "pallas", "cudnn", "auto"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]


class RopeScaling(StrictModel):
    """RoPE frequency scaling: ``llama3`` (Llama 3.1+) or ``linear`` (position interpolation)."""

    rope_type: Literal["llama3", "linear"]
    factor: float = pydantic.Field(gt=0)
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


class ModelConfig(StrictModel):
    """Everything that shapes the decoder; mirrors the fields of Hugging Face ``config.json``."""

    architecture: Architecture = "llama"
    vocab_size: int = pydantic.Field(gt=0)
    hidden_size: int = pydantic.Field(gt=0)
    num_layers: int = pydantic.Field(gt=0)
    num_heads: int = pydantic.Field(gt=0)
    num_kv_heads: int = pydantic.Field(gt=0)
    head_dim: int | None = None
    intermediate_size: int = pydantic.Field(gt=0)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    param_dtype: DType = "float32"
    dtype: DType = "float32"
    attention: AttentionImpl = "xla"
    remat: RematPolicy = "none"
    scan_layers: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @pydantic.model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) not divisible by num_heads ({self.num_heads}); set head_dim")
        return self

    @property
    def dim_per_head(self) -> int:
        """Head dimension (``head_dim`` or ``hidden_size // num_heads``)."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        """Activation / matmul dtype."""
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        """Parameter storage dtype."""
        return jnp.dtype(self.param_dtype)

    @property
    def eos_ids(self) -> list[int]:
        """End-of-sequence ids as a list (possibly empty)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def num_params(self) -> int:
        """Parameter count (embeddings included)."""
        h, d, f = self.hidden_size, self.dim_per_head, self.intermediate_size
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * d
        layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Analytic matmul FLOPs per token (forward x3 when training), attention included (causal halved)."""
        # Matmul weights: every layer plus the lm head; an untied input embedding is a lookup, not a matmul.
        n = self.num_params() - (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)
        attn = 2 * self.num_layers * self.num_heads * self.dim_per_head * seq_len  # QK^T + PV, causal half of 4
        fwd = 2 * n + attn
        return float(fwd * (3 if training else 1))


def load_model_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    """Load a model preset (``configs/model/*.yaml`` or any path) with dotted overrides."""
    return load_config(ModelConfig, path, overrides)
