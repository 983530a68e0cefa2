"""Hugging Face import/export: ``model, cfg = hf.load_pretrained(dir)``; ``hf.save_pretrained(model, cfg, out)``."""

from ditto_jax.hf.config import HFCheckpointError, from_hf_config, to_hf_config
from ditto_jax.hf.load import load_pretrained
from ditto_jax.hf.save import save_pretrained

__all__ = ["HFCheckpointError", "from_hf_config", "load_pretrained", "save_pretrained", "to_hf_config"]
