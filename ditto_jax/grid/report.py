"""The grid's tables and heatmap: rows = seed models, columns = supervision models (+ ``none``: no role-play
data), one table per metric (overall split), as the paper's cross-supervision figure."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ditto_jax.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from ditto_jax.grid.config import NONE, cell_name

METRICS = (("consistency", "Consistency (0-1)"), ("knowledge", "Knowledge (1-10)"),
           ("rejection", "Rejection (0-1)"), ("mtbench", "Roleplay grade (1-10)"))
GRID_JSON, GRID_MD, GRID_PNG = "grid.json", "grid.md", "grid.png"


def _value(report: Mapping[str, Any], metric: str) -> float | None:
    if metric == "mtbench":
        return (report.get("mtbench") or {}).get("roleplay")
    return ((report.get("metrics") or {}).get("all") or {}).get(metric)


def grid_values(seeds: Sequence[str], columns: Sequence[str], reports: Mapping[str, Mapping[str, Any]]
                ) -> dict[str, list[list[float | None]]]:
    """``metric -> rows (seeds) x columns (supervisors, none)``."""
    return {m: [[_value(reports[cell_name(s, c)], m) for c in columns] for s in seeds] for m, _ in METRICS}


def grid_markdown(seeds: Sequence[str], columns: Sequence[str], values: Mapping[str, Any],
                  unreliable: Sequence[str] = ()) -> str:
    """One markdown table per metric."""
    out = ["# Cross-supervision grid", "",
           "Rows: the seed model that is fine-tuned; columns: the supervision model that simulated its corpus "
           f"(`{NONE}`: the seed model without role-play data). One judge scores every cell.", ""]
    for metric, title in METRICS:
        if all(v is None for row in values[metric] for v in row):
            continue
        flag = " (judge calibration failed: unreliable)" if metric in unreliable else ""
        out += [f"## {title}{flag}", "", "| seed \\ supervision | " + " | ".join(columns) + " |",
                "|---|" + "---:|" * len(columns)]
        for seed, row in zip(seeds, values[metric]):
            out.append(f"| {seed} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in row) + " |")
        out.append("")
    out += ["![grid](grid.png)", ""]
    return "\n".join(out)


def grid_heatmap(seeds: Sequence[str], columns: Sequence[str], values: Mapping[str, Any]) -> bytes:
    """PNG: one heatmap per metric, cells annotated."""
    import matplotlib  # noqa: PLC0415 (slow to import; only when a plot is written)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after the Agg backend is selected)

    shown = [(m, t) for m, t in METRICS if not all(v is None for row in values[m] for v in row)]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown) + 1, 0.6 * len(seeds) + 2.2), dpi=110,
                             squeeze=False)
    for ax, (metric, title) in zip(axes[0], shown):
        data = np.array([[np.nan if v is None else v for v in row] for row in values[metric]], dtype=float)
        scale = (0, 1) if metric in ("consistency", "rejection") else (1, 10)
        ax.imshow(data, cmap="viridis", vmin=scale[0], vmax=scale[1], aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(seeds)), seeds, fontsize=8)
        ax.set_xlabel("supervision", fontsize=8)
        ax.set_title(title, fontsize=9)
        for i in range(len(seeds)):
            for j in range(len(columns)):
                text = "–" if np.isnan(data[i, j]) else f"{data[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white")
    axes[0][0].set_ylabel("seed", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_grid_report(workdir: Path, seeds: Sequence[str], columns: Sequence[str],
                      reports: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``grid.json``, ``grid.md`` and ``grid.png``; returns the JSON content."""
    values = grid_values(seeds, columns, reports)
    unreliable = sorted({m for r in reports.values() for m in r.get("unreliable_metrics") or ()})
    result = {"seeds": list(seeds), "columns": list(columns), "values": values, "unreliable_metrics": unreliable,
              "cells": {name: {"metrics": r.get("metrics"), "mtbench": r.get("mtbench")} for name, r in reports.items()},
              **extra}
    atomic_write_json(workdir / GRID_JSON, result)
    atomic_write_text(workdir / GRID_MD, grid_markdown(seeds, columns, values, unreliable))
    atomic_write_bytes(workdir / GRID_PNG, grid_heatmap(seeds, columns, values))
    return result
