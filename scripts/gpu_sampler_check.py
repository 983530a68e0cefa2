"""GPU correctness check of the sampler: greedy output with the Pallas decode kernel equals the XLA path.

Random-init 40M model in float32 (so the two attention paths agree to rounding), prompts of different lengths
in one batch. Prints one JSON object: per-prompt token match and the overall ``match`` fraction.
``--small`` uses the tiny model (CPU, interpret mode) to prove the script runs.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    """Run both attention paths and compare greedy tokens."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)

    from ditto_jax.config import apply_overrides, read_yaml, validate
    from ditto_jax.model import ModelConfig, create_model
    from ditto_jax.sampling import Request, SamplingEngine, SamplingParams

    preset = "model/tiny" if args.small else "model/40m"
    new = 8 if args.small else args.new_tokens
    rng = np.random.default_rng(0)
    outputs = {}
    for impl in ("xla", "pallas"):
        cfg = validate(ModelConfig, apply_overrides(read_yaml(preset), [f"attention={impl}", "dtype=float32",
                                                                         "param_dtype=float32"]), preset)
        model = create_model(cfg, seed=0)
        vocab = cfg.vocab_size
        prompts = [rng.integers(3, vocab, size=n).tolist() for n in (5, 17, 33, 64)]
        rng = np.random.default_rng(0)  # same prompts for both paths
        engine = SamplingEngine(model, None, batch_size=4, max_len=128 + new)
        params = SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True)
        outputs[impl] = {r.id: r.output_ids for r in engine.generate(
            Request(str(i), p, params) for i, p in enumerate(prompts))}
    per = {}
    for rid, ref in outputs["xla"].items():
        got = outputs["pallas"][rid]
        same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        per[rid] = {"tokens": len(ref), "identical_prefix": same}
    match = sum(v["identical_prefix"] for v in per.values()) / max(1, sum(v["tokens"] for v in per.values()))
    print(json.dumps({"match": round(match, 4), "per_prompt": per, "passed": match == 1.0}))
    return 0 if match == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
