"""Model presets: real-family shapes (parameter counts checked against transformers) and config round trips."""

from __future__ import annotations

import pytest
import torch
import transformers

from ditto_jax.hf import from_hf_config, to_hf_config
from ditto_jax.model import load_model_config

# Parameter counts as published for the Hugging Face checkpoints.
PRESETS = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "llama3.1-8b": 8_030_261_248,
    "tiny": None,
    "40m": None,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_matches_transformers_and_round_trips(name):
    cfg = load_model_config(f"model/{name}")
    hf_cfg = to_hf_config(cfg)
    config = transformers.AutoConfig.for_model(**hf_cfg)
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in hf_model.parameters()) == cfg.num_params()
    if PRESETS[name] is not None:
        assert cfg.num_params() == PRESETS[name]
    back = from_hf_config(hf_cfg)
    runtime_only = {"attention", "remat", "scan_layers", "head_dim"}
    assert back.model_dump(exclude=runtime_only) == cfg.model_dump(exclude=runtime_only)
    assert back.dim_per_head == cfg.dim_per_head
