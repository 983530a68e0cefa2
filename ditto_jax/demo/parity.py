"""Does transformers load our Hugging Face export and compute the same logits as our model?"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np


def transformers_available() -> bool:
    """Whether transformers and torch can be imported (the check needs both)."""
    return all(importlib.util.find_spec(name) is not None for name in ("transformers", "torch"))


def check_token_ids(vocab_size: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Reproducible random token ids ``[batch, length]`` over the whole vocabulary."""
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, length), dtype=np.int32)


def transformers_logit_diff(export_dir: str | Path, model: Any, token_ids: np.ndarray) -> dict[str, Any]:
    """Load ``export_dir`` with ``AutoModelForCausalLM`` (float32) and compare its logits with ``model``'s.

    Returns ``{"max_abs_diff", "architecture", "tokens"}``; raises if transformers cannot load the folder.
    """
    import torch  # noqa: PLC0415 (torch and transformers are the reference, not runtime dependencies)
    import transformers  # noqa: PLC0415 (optional reference)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf_model(torch.as_tensor(token_ids, dtype=torch.long)).logits.float().numpy()
    ours = np.asarray(model(np.asarray(token_ids, np.int32)), dtype=np.float32)
    if ours.shape != ref.shape:
        raise ValueError(f"logit shapes differ: ours {ours.shape}, transformers {ref.shape}")
    return {"max_abs_diff": float(np.abs(ours - ref).max()), "architecture": type(hf_model).__name__,
            "tokens": int(token_ids.size)}
