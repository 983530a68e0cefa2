"""One device call: check correctness on the GPU, then time kernels, sampling and training.

Run on the lent machine from the repository root (``bash scripts/gpu_check.sh``). Every section runs in its
own subprocess with its own time limit, so one failure or hang costs only that section; the results are
gathered into ``OUT/gpu-<device>-<date>.json`` and a markdown table ``OUT/gpu-<device>-<date>.md``.

``--small`` runs the same sections on CPU with tiny shapes (interpret mode), which is how CI-side tests
prove the script works before a GPU minute is spent.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PY = sys.executable


def _run(name: str, cmd: list[str], timeout: float, out_dir: Path) -> dict[str, Any]:
    """Run one section; parse the last JSON object it prints. Never raises."""
    t0 = time.time()
    log = out_dir / f"{name}.log"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        text = proc.stdout
        log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-20000:]}\n")
        result: dict[str, Any] = {"returncode": proc.returncode}
        for line in reversed(text.strip().splitlines()):
            line = line.strip()
            if line.startswith("{") and line.endswith("}"):
                try:
                    result["result"] = json.loads(line)
                    break
                except json.JSONDecodeError:
                    continue
        if proc.returncode != 0:
            result["error"] = proc.stderr.strip().splitlines()[-5:] if proc.stderr.strip() else ["(no stderr)"]
    except subprocess.TimeoutExpired as exc:
        log.write_text(f"$ {' '.join(cmd)}\nTIMEOUT after {timeout}s\n{(exc.stdout or b'')!r}\n")
        result = {"returncode": None, "error": [f"timeout after {timeout}s"]}
    result["seconds"] = round(time.time() - t0, 1)
    result["command"] = " ".join(cmd[1:] if cmd[0] == PY else cmd)
    print(f"[gpu_check] {name}: rc={result['returncode']} in {result['seconds']}s", flush=True)
    return result


def _device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
        return out[0] if out else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


def _variant(preset: str, out_dir: Path, **overrides: str) -> str:
    """Write a copy of a model preset with some fields changed; returns its path."""
    import yaml

    from ditto_jax.config import read_yaml

    data = read_yaml(preset)
    data.update(overrides)
    path = out_dir / "configs" / f"{Path(preset).stem}-{'-'.join(f'{k}{v}' for k, v in overrides.items())}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return str(path)


def sections(small: bool, out_dir: Path) -> list[tuple[str, list[str], float]]:
    """(name, command, timeout) for every section, in order: checks first, then timings."""
    cli = [PY, "-m", "ditto_jax.cli", "bench"]
    preset = "model/tiny" if small else "model/gpu-1b"
    prompt, new, b64, seq, tb = (16, 16, 4, 64, 1) if small else (128, 256, 64, 4096, 4)
    kern = ["--preset", "cpu"] if small else ["--preset", "gpu"]
    # In-process (no per-backend children): on the H200 the isolated runs hung past their limits, in-process
    # runs finished in seconds (benchmarks/gpu-h200-2026-11-27.md).
    check = [PY, "scripts/gpu_kernels_check.py", "--isolate", "off"] + (["--small"] if small else [])
    decode_impl = "pallas"
    cfg_pallas = _variant(preset, out_dir, attention=decode_impl)
    cfg_xla = _variant(preset, out_dir, attention="xla")
    cfg_train = _variant(preset, out_dir, attention="pallas" if small else "auto")

    def sample(b: int, cfg: str) -> list[str]:
        return cli + ["sample", "--config", cfg, "--batch", str(b), "--prompt-len", str(prompt), "--new-tokens",
                      str(new), "--top-p", "0.8", "--ignore-eos", "--repeats", "2", "--json"]

    return [
        ("env", [PY, "-c", "import jax,json;print(json.dumps({'jax':jax.__version__,'backend':jax.default_backend(),"
                 "'devices':[str(d) for d in jax.devices()]}))"], 120),
        ("kernels_check", check + ["--out", str(out_dir / "kernels_check.json")], 600 if small else 240),
        ("kernels_bench", cli + ["kernels", *kern, "--isolate", "off", "--json", "--out-dir", str(out_dir / "kernels")], 300),
        ("sampler_check", [PY, "scripts/gpu_sampler_check.py"] + (["--small"] if small else []), 240),
        ("sample_b1_pallas", sample(1, cfg_pallas), 180),
        ("sample_b64_pallas", sample(b64, cfg_pallas), 180),
        ("sample_b64_xla", sample(b64, cfg_xla), 180),
        ("train_seq4096", cli + ["train", "--config", cfg_train, "--batch", str(tb), "--seq-len", str(seq),
                                 "--override", "remat=none" if small else "remat=full", "--rounds", "2",
                                 "--no-forward", "--json"], 300),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run every section and write the gathered JSON and markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks"))
    ap.add_argument("--small", action="store_true", help="CPU smoke run with tiny shapes")
    ap.add_argument("--only", default=None, help="comma list of section names")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run: each section's limit is cut to what is left")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = _device_name()
    date = dt.date.today().isoformat()
    report: dict[str, Any] = {"device": device, "date": date, "host": os.uname().nodename, "sections": {}}
    wanted = set(args.only.split(",")) if args.only else None
    slug = device.lower().replace("nvidia ", "").replace(" ", "-")
    stem = out_dir / f"gpu-{slug}-{date}"
    deadline = time.time() + args.budget if args.budget else None
    for name, cmd, timeout in sections(args.small, out_dir):
        if wanted and name not in wanted:
            continue
        if deadline is not None:
            timeout = min(timeout, deadline - time.time())
            if timeout < 20:
                report["sections"][name] = {"returncode": None, "error": ["skipped: run budget spent"]}
                continue
        report["sections"][name] = _run(name, cmd, timeout, out_dir)
        # Written after every section, so a run cut short still leaves what it measured.
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
    print(json.dumps({"written": str(stem) + ".{json,md}", "ok": all(
        s.get("returncode") == 0 for s in report["sections"].values())}))
    return 0


def markdown(report: dict[str, Any]) -> str:
    """A compact table: one row per section with its headline figures."""
    lines = [f"# GPU measurement — {report['device']} — {report['date']}", "",
             "| section | status | seconds | headline |", "|---|---|---|---|"]
    for name, sec in report["sections"].items():
        res = sec.get("result") or {}
        keys = [k for k in ("tokens_per_s", "tflops", "mfu", "roofline_fraction", "gbps", "passed", "failed", "match")
                if k in res]
        head = ", ".join(f"{k}={res[k]}" for k in keys) or ("; ".join(sec.get("error", [])) if sec.get("error") else "")
        status = "ok" if sec.get("returncode") == 0 else "FAIL"
        lines.append(f"| {name} | {status} | {sec.get('seconds')} | {head} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
