"""Tiny random-init Hugging Face models (built with transformers, torch CPU) for the hf/ and model tests."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import transformers
from flax import nnx

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)

# One variant per family, together covering: tied/untied embeddings, llama3 rope scaling, qkv bias, q/k norm with
# head_dim != hidden/heads, MQA (1 kv head) and a sliding window shorter than the test sequences.
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, num_key_value_heads=1,
                                                            sliding_window=5)),
}


def make_hf_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random-init HF model of ``family`` (eval mode, float32); norms and biases perturbed away from 1/0."""
    cfg_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, cfg_name)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def save_hf(model: transformers.PreTrainedModel, path: Path, dtype: torch.dtype | None = None,
            max_shard_size: str | int | None = None) -> Path:
    """``save_pretrained`` (safetensors), optionally cast and sharded."""
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def hf_logits(model: transformers.PreTrainedModel, ids: np.ndarray) -> np.ndarray:
    """float32 logits ``[B, T, V]`` of an HF model."""
    with torch.no_grad():
        return model.float()(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def token_batch(batch: int = 3, length: int = 12, seed: int = 0) -> np.ndarray:
    """Random token ids ``[batch, length]``."""
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


@functools.cache
def _forward():
    return nnx.jit(lambda model, ids: model(ids))


def forward(model, ids) -> np.ndarray:
    """Our logits through one cached ``nnx.jit`` (models with equal configs share the compilation)."""
    return np.asarray(_forward()(model, np.asarray(ids, np.int32)))


def hf_state(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF folder (all shards) as numpy, dtype kept."""
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out
