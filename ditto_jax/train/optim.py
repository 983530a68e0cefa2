"""AdamW with linear warm-up, cosine decay to a floor, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax
import pydantic

from ditto_jax.config import StrictModel

# Leaf names that get weight decay: matmul kernels and embeddings. Norm scales and biases never do.
DECAYED_LEAVES = frozenset({"kernel", "embed_tokens", "lm_head"})


class OptimConfig(StrictModel):
    """AdamW and its schedule (defaults: the Ditto paper, peak 2e-6 -> 2e-7 with 10% warm-up)."""

    peak_lr: float = pydantic.Field(2e-6, gt=0)
    end_lr: float = pydantic.Field(2e-7, ge=0)
    warmup_fraction: float = pydantic.Field(0.1, ge=0, lt=1)
    b1: float = pydantic.Field(0.9, ge=0, lt=1)
    b2: float = pydantic.Field(0.95, ge=0, lt=1)
    eps: float = pydantic.Field(1e-8, gt=0)
    weight_decay: float = pydantic.Field(0.0, ge=0)
    clip_norm: float | None = pydantic.Field(1.0, gt=0)

    @pydantic.model_validator(mode="after")
    def _floor_below_peak(self) -> "OptimConfig":
        if self.end_lr > self.peak_lr:
            raise ValueError(f"end_lr ({self.end_lr}) must not exceed peak_lr ({self.peak_lr})")
        return self


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak_lr`` over ``warmup_fraction`` of the steps, then cosine to ``end_lr``."""
    warmup = int(round(cfg.warmup_fraction * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.end_lr,
    )


def decay_mask(params: Any) -> Any:
    """``True`` for leaves that get weight decay (kernels, embeddings), ``False`` for norm scales and biases."""

    def one(path: tuple[Any, ...], _: Any) -> bool:
        name = getattr(path[-1], "key", getattr(path[-1], "name", str(path[-1])))
        return str(name) in DECAYED_LEAVES

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Clipping (if set) followed by AdamW with the schedule and the decay mask."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm is not None else []
    parts.append(optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
