"""``ditto-jax demo``: simulation -> corpus -> SFT -> export -> evaluation on the embedded default, resumable."""

from ditto_jax.demo.config import DemoConfig, StageDirs, load_demo_config
from ditto_jax.demo.pipeline import Demo, DemoError, run_demo
from ditto_jax.demo.summary import format_summary

__all__ = ["Demo", "DemoConfig", "DemoError", "StageDirs", "format_summary", "load_demo_config", "run_demo"]
