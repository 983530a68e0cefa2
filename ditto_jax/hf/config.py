"""Translate Hugging Face ``config.json`` to and from ``ModelConfig`` (Llama, Qwen2, Qwen3, Mistral).

Reads both the legacy layout (``rope_theta`` + ``rope_scaling``, ``torch_dtype``) and the transformers 5
layout (``rope_parameters``, ``dtype``); writes the legacy layout, which every transformers version loads.
Anything the decoder cannot represent (an unknown architecture, ``llama`` attention/MLP bias, mixed
sliding/full layers, other rope types, another activation) is an error naming the field.
"""

from __future__ import annotations

from typing import Any

from ditto_jax.model.config import ModelConfig, RopeScaling


class HFCheckpointError(ValueError):
    """A Hugging Face folder cannot be read or written; the message names the file, tensor or field."""


# architecture class in config.json -> (our architecture, model_type)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "llama"),
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
    "Qwen3ForCausalLM": ("qwen3", "qwen3"),
    "MistralForCausalLM": ("mistral", "mistral"),
}
MODEL_TYPES = {model_type: arch for arch, model_type in ARCHITECTURES.values()}
ARCH_CLASS = {arch: cls for cls, (arch, _) in ARCHITECTURES.items()}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def detect_architecture(hf: dict[str, Any], source: str = "config.json") -> str:
    """Our architecture name from ``architectures`` (or ``model_type``); unknown ones are an error."""
    classes = hf.get("architectures") or []
    for cls in classes:
        if cls in ARCHITECTURES:
            return ARCHITECTURES[cls][0]
    model_type = hf.get("model_type")
    if not classes and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    supported = ", ".join(ARCHITECTURES)
    raise HFCheckpointError(
        f"{source}: unsupported architecture {classes or model_type!r} (field 'architectures'/'model_type'); "
        f"supported: {supported}"
    )


def _rope(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(params, dict):  # transformers 5: theta and scaling in one dict
        theta = params.get("rope_theta", theta)
        scaling = params if params.get("rope_type", "default") != "default" else scaling
    theta = 10000.0 if theta is None else float(theta)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind not in ("llama3", "linear"):
        raise HFCheckpointError(
            f"{source}: unsupported rope scaling type {kind!r} (field 'rope_scaling'); supported: llama3, linear"
        )
    fields = {k: v for k, v in scaling.items() if k in RopeScaling.model_fields and k != "rope_type"}
    if "factor" not in fields:
        raise HFCheckpointError(f"{source}: rope_scaling of type {kind!r} has no 'factor'")
    return theta, RopeScaling(rope_type=kind, **fields)


def _sliding_window(hf: dict[str, Any], arch: str, num_layers: int, source: str) -> int | None:
    window = hf.get("sliding_window")
    if arch == "mistral":
        return int(window) if window else None
    if arch not in ("qwen2", "qwen3"):
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        if not hf.get("use_sliding_window", False) or not window:
            return None
        first_sliding = int(hf.get("max_window_layers", num_layers))
        layer_types = ["full_attention" if i < first_sliding else "sliding_attention" for i in range(num_layers)]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"} and window:
        return int(window)
    raise HFCheckpointError(
        f"{source}: per-layer attention types {sorted(kinds)} (fields 'layer_types'/'use_sliding_window'/"
        f"'max_window_layers') are not supported: every layer must use the same attention"
    )


def _require_false(hf: dict[str, Any], field: str, source: str) -> None:
    if hf.get(field):
        raise HFCheckpointError(f"{source}: {field}=true is not supported by this decoder (field {field!r})")


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A ``ModelConfig`` from a parsed Hugging Face ``config.json`` (``source`` names it in errors)."""
    arch = detect_architecture(hf, source)
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        raise HFCheckpointError(f"{source}: hidden_act={act!r} is not supported (only 'silu'; field 'hidden_act')")
    if arch in ("llama", "qwen3", "mistral"):
        _require_false(hf, "attention_bias", source)
    if arch == "llama":
        _require_false(hf, "mlp_bias", source)
    if hf.get("quantization_config"):
        raise HFCheckpointError(f"{source}: quantized checkpoints are not supported (field 'quantization_config')")
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if field not in hf:
            raise HFCheckpointError(f"{source}: required field {field!r} is missing")
    num_layers = int(hf["num_hidden_layers"])
    theta, scaling = _rope(hf, source)
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch.")
    if dtype not in DTYPES:
        raise HFCheckpointError(f"{source}: unsupported dtype {dtype!r} (field 'torch_dtype'/'dtype')")
    values = dict(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=num_layers,
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        intermediate_size=hf["intermediate_size"],
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        sliding_window=_sliding_window(hf, arch, num_layers, source),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        initializer_range=hf.get("initializer_range", 0.02),
        param_dtype=dtype,
        dtype=dtype,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    try:
        return ModelConfig(**values)
    except ValueError as exc:
        raise HFCheckpointError(f"{source}: {exc}") from None


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict for ``cfg`` (legacy rope layout, loadable by transformers 4.x and 5.x)."""
    arch = cfg.architecture
    out: dict[str, Any] = {
        "architectures": [ARCH_CLASS[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling.model_dump() if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": cfg.param_dtype,
        "use_cache": True,
    }
    if arch == "qwen2" and cfg.head_dim is None:
        del out["head_dim"]  # Qwen2Config has no head_dim field (derived from hidden_size / heads)
    if arch == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if arch == "qwen3":
        out["attention_bias"] = False
    if arch in ("qwen2", "qwen3"):
        window = cfg.sliding_window
        out.update(use_sliding_window=window is not None, sliding_window=window,
                   max_window_layers=0 if window is not None else cfg.num_layers)
    if arch == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling.factor}
    return out


def generation_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``generation_config.json`` dict (special token ids only; sampling settings are ours)."""
    out: dict[str, Any] = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(cfg, key)
        if value is not None:
            out[key] = value
    return out
