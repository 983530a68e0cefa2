"""Training metrics: MFU against the device peak (measured matmul rate on CPU), JSONL and TensorBoard output."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from tensorboardX import SummaryWriter

from ditto_jax.fileio import atomic_write_text

# Dense peak FLOP/s per chip (bf16; fp32 matmuls on GPU use TF32) from the vendors' data sheets.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "tpu v4": {"bfloat16": 275e12, "float32": 275e12},
    "tpu v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "tpu v5e": {"bfloat16": 197e12, "float32": 197e12},
    "tpu v5p": {"bfloat16": 459e12, "float32": 459e12},
    "tpu v5": {"bfloat16": 459e12, "float32": 459e12},
    "tpu v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e / Trillium
    "tpu v6e": {"bfloat16": 918e12, "float32": 918e12},
    "h200": {"bfloat16": 989e12, "float32": 494e12},
    "h100": {"bfloat16": 989e12, "float32": 494e12},
    "a100": {"bfloat16": 312e12, "float32": 156e12},
}


def measure_matmul_flops(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of one jitted ``[size, size] @ [size, size]`` matmul on the default device."""
    a = jnp.ones((size, size), dtype)
    b = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def device_peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """``(peak FLOP/s per device, how it was obtained)``: data-sheet peak on TPU/GPU, a measured matmul on CPU."""
    device = jax.devices()[0]
    kind = device.device_kind.lower()
    if device.platform != "cpu":
        for name, peaks in PEAK_FLOPS.items():
            if name in kind:
                return peaks.get(dtype, peaks["bfloat16"]), f"data sheet ({device.device_kind})"
    return measure_matmul_flops(dtype), f"measured {dtype} matmul on {device.device_kind}"


class MetricsWriter:
    """Appends one JSON line a step to ``WORKDIR/metrics.jsonl`` (and TensorBoard scalars); process 0 only."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        self._file = None
        if not self.enabled:
            return
        self._truncate_after(resume_step)
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Keep only complete lines of steps ``<= step`` (a resumed run rewrites what came after)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if isinstance(rec, dict) and rec.get("step", step + 1) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Log one record (must contain ``step``)."""
        if not self.enabled:
            return
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        """Flush and close the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
