"""One device call: check correctness on the GPU, then time kernels, training and sampling.

Run on the lent machine from the repository root (``bash scripts/gpu_check.sh --budget 420``). Every section
runs in its own subprocess with its own time limit, so one failure or hang costs only that section; the
results are gathered into ``OUT/gpu-<device>-<date>.json`` and a markdown table ``OUT/gpu-<device>-<date>.md``
(rewritten after every section). What comes back (at most 8 files, 2 folders deep): those two,
``kernels_check.json`` (every correctness entry, rewritten after each), ``sections.log`` (each section's
command, stdout and the tail of its stderr) and ``kernels_tune/kernels.{json,md,png}`` (the tiling sweep,
rewritten after every entry). Model configs and the length sweep's own files go to a scratch folder.

Order: correctness first (in-process, a time limit per case: ``scripts/gpu_kernels_check.py``), then the
tiling sweep (``kernels_tune``: cuDNN, the Mosaic GPU forward + backward, the Triton defaults, then the
prepared variants of ``ditto_jax.bench.kernel_tuning`` at [2, 8192, 16, 128] bf16, forward and backward, the
goals met / not met), then SFT of the 1.24B config at S=4096 (Pallas through ``auto``: Mosaic GPU forward
when its self-check passes under the train step's trace, else Triton; Pallas forced to Triton; and, time
permitting, auto with the Mosaic GPU backward), the
sampler at B=64 on a SmolLM2-135M-shaped model (random init: the GGUF file cannot travel), and last the
sequence-length sweep with the tuned spec. With ``--budget`` each section's limit is cut to what is left;
the two sweeps take ``--budget`` themselves, the tuning sweep whatever is left after reserving the later
sections' typical time, and stop cleanly (they write their results after every entry, and a section cut
short is read back from that file). Both sweeps run with ``--isolate restart --entry-timeout 90``: a hung
entry costs 90 s and a process start, not the sweep; a flash correctness case that hung makes the sweeps skip
that lowering at that mask only (``--skip-flash``).

``--small`` runs the same sections on CPU with tiny shapes (interpret mode), which is how CI-side tests
prove the script works before a GPU minute is spent.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PY = sys.executable


# Seconds past its own --budget a sweep may run: process start and device init, the entry in progress when the
# budget runs out (one flash variant at S=8192, forward and backward: two compiles), the final write.
SWEEP_GRACE_S = 40.0


@dataclasses.dataclass
class Section:
    """One step of the run: its command, time limit, and what it typically costs (planning with --budget)."""

    name: str
    cmd: list[str]
    timeout: float
    typical_s: float = 30.0  # reserved for it when an earlier sweep sizes its budget (last lease: H200)
    takes_budget: bool = False  # a sweep: gets --budget (what is left after reserving later sections)
    result_file: str | None = None  # JSON the section rewrites as it goes: read when it is cut short
    add_tuned_impl: bool = False  # append kernels_tune's fastest spec to its --impls
    drop_hung: bool = False  # --skip-flash the (lowering, mask) pairs whose correctness case hung
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # added to the environment
    time_flag: str | None = None  # option that receives the section's limit less a margin (own time keeping)


def _run(name: str, cmd: list[str], timeout: float, out_dir: Path, result_file: str | None = None,
         env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one section; parse the last JSON object it prints (else its ``result_file``). Never raises.

    Its command, stdout and the tail of its stderr are appended to ``out_dir/sections.log``.
    """
    t0 = time.time()
    if result_file:  # never read back a previous run's file
        Path(result_file).unlink(missing_ok=True)
    stdout, stderr = "", ""
    # Its own process group, killed whole at the limit: a section that restarts children (the check, the
    # sweeps with --isolate restart) must not leave one holding the device while the next section runs.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        result: dict[str, Any] = {"returncode": proc.returncode}
        for line in reversed(stdout.strip().splitlines()):
            line = line.strip()
            if line.startswith("{") and line.endswith("}"):
                try:
                    result["result"] = json.loads(line)
                    break
                except json.JSONDecodeError:
                    continue
        if proc.returncode != 0:
            result["error"] = stderr.strip().splitlines()[-5:] if stderr.strip() else ["(no stderr)"]
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = proc.communicate()
        result = {"returncode": None, "error": [f"timeout after {timeout:.0f}s"]}
    # Which lowering the kernels fell back to, and why (a Mosaic GPU self-check failure, say).
    warned = sorted({line.strip()[:400] for line in stderr.splitlines() if "flash_attention:" in line})
    if warned:
        result["kernel_warnings"] = warned
    if "result" not in result and result_file and Path(result_file).exists():
        try:  # multi-line JSON, or cut short: keep what the section wrote
            result["result"] = json.loads(Path(result_file).read_text())
            result["result_from_file"] = result_file
        except (OSError, json.JSONDecodeError):
            pass
    result["seconds"] = round(time.time() - t0, 1)
    result["command"] = " ".join(cmd[1:] if cmd[0] == PY else cmd)
    with open(out_dir / "sections.log", "a", encoding="utf-8") as log:
        log.write(f"=== {name}: {' '.join(f'{k}={v}' for k, v in (env or {}).items())} {' '.join(cmd)}\n"
                  f"--- rc={result['returncode']} in {result['seconds']}s\n--- stdout\n{stdout[-20000:]}\n"
                  f"--- stderr (tail)\n{stderr[-12000:]}\n\n")
    print(f"[gpu_check] {name}: rc={result['returncode']} in {result['seconds']}s", flush=True)
    return result


def _device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
        return out[0] if out else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M-Instruct config.json), for the sampler at B=64 with random
# weights: the real GGUF file (98 MB) cannot travel with the working tree (64 MiB).
SMOLLM2_135M = {
    "architecture": "llama", "vocab_size": 49152, "hidden_size": 576, "num_layers": 30, "num_heads": 9,
    "num_kv_heads": 3, "head_dim": 64, "intermediate_size": 1536, "rope_theta": 100000.0, "rms_norm_eps": 1.0e-5,
    "tie_word_embeddings": True, "max_position_embeddings": 8192, "param_dtype": "bfloat16", "dtype": "bfloat16",
}


def _variant(preset: str | dict, scratch: Path, name: str | None = None, **overrides: str) -> str:
    """Write a copy of a model preset (a preset name, or a config dict) with some fields changed; its path."""
    import yaml

    from ditto_jax.config import read_yaml

    data = dict(preset) if isinstance(preset, dict) else read_yaml(preset)
    data.update(overrides)
    stem = name or Path(str(preset)).stem
    path = scratch / "configs" / f"{stem}-{'-'.join(f'{k}{v}' for k, v in overrides.items())}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return str(path)


def sections(small: bool, out_dir: Path, scratch: Path | None = None) -> list[Section]:
    """Every section, in order: checks, the tiling sweep, training, sampling, the length sweep."""
    scratch = scratch or out_dir / "scratch"
    cli = [PY, "-m", "ditto_jax.cli", "bench"]
    preset = "model/tiny" if small else "model/gpu-1b"
    prompt, new, b64, seq, tb = (16, 16, 4, 64, 1) if small else (128, 256, 64, 4096, 4)
    # In-process, a time limit per case (a case that hangs ends its child process, a new one goes on).
    check = [PY, "scripts/gpu_kernels_check.py"] + (["--small", "--isolate", "off"] if small else [
        "--backends", "triton,mosaic_gpu,mosaic_gpu@mgpu_bwd=1,auto", "--case-timeout", "75"])
    tune_dir, sweep_dir = out_dir / "kernels_tune", scratch / "kernels_sweep"
    if small:
        tune = ["--preset", "cpu-tiny", "--impls", "tune-small", "--decode-impls", "tune-small", "--modes", "fwd",
                "--iters", "1", "--warmup", "0", "--entry-timeout", "300"]
        length_sweep = ["--preset", "cpu", "--modes", "fwd", "--iters", "1", "--warmup", "0", "--entry-timeout",
                        "300"]
    else:
        # One entry (an impl at one shape, forward + backward, two compiles) past 90 s is recorded as a timeout
        # and a fresh process goes on after it (the 2026-12-04 lease lost the rest of the sweep to one entry).
        tune = ["--preset", "gpu-goal", "--impls", "tune", "--decode-impls", "tune", "--modes", "fwd,bwd",
                "--iters", "10", "--confirm-best", "--entry-timeout", "90"]
        length_sweep = ["--preset", "gpu-sweep", "--impls", "pallas,cudnn", "--no-decode", "--iters", "10",
                        "--entry-timeout", "90"]
    cfg_train = _variant(preset, scratch, attention="pallas")
    small_model = preset if small else SMOLLM2_135M
    cfg_smol_pallas = _variant(small_model, scratch, "smollm2-135m", attention="pallas")
    cfg_smol_xla = _variant(small_model, scratch, "smollm2-135m", attention="xla")

    def sample(b: int, cfg: str) -> list[str]:
        return cli + ["sample", "--config", cfg, "--batch", str(b), "--prompt-len", str(prompt), "--new-tokens",
                      str(new), "--top-p", "0.8", "--ignore-eos", "--repeats", "2", "--json"]

    def train(extra: list[str]) -> list[str]:
        return cli + ["train", "--config", cfg_train, "--batch", str(tb), "--seq-len", str(seq), "--override",
                      "remat=none" if small else "remat=full", "--rounds", "2", "--no-forward", "--json", *extra]

    return [
        Section("env", [PY, "-c", "import jax,json;print(json.dumps({'jax':jax.__version__,'backend':"
                        "jax.default_backend(),'devices':[str(d) for d in jax.devices()]}))"], 120, typical_s=5),
        Section("kernels_check", check + ["--out", str(out_dir / "kernels_check.json")], 600 if small else 170,
                typical_s=100, result_file=str(out_dir / "kernels_check.json"), time_flag="--timeout"),
        Section("kernels_tune", cli + ["kernels", *tune, "--isolate", "restart", "--json", "--out-dir", str(tune_dir)],
                600 if small else 300, typical_s=150, takes_budget=True, result_file=str(tune_dir / "kernels.json"),
                drop_hung=True),
        # SFT with the Pallas kernels as the model picks them (auto: Mosaic GPU forward once its self-check has
        # passed under this trace, Triton backward), then with Triton forced. The model's cuDNN path takes
        # batches without segment ids only, and the train step always passes them: no cuDNN SFT row.
        # Reserved before the tuning sweep: 40 + 30 + 30 s (the 1.24B train section took ~20 s on the last lease).
        Section("train_seq4096_pallas", train([]), 600 if small else 150, typical_s=40),
        Section("train_seq4096_triton", train([]), 600 if small else 120, typical_s=30,
                env={"DITTO_ATTN_BACKEND": "interpret" if small else "triton"}),
        Section("sample_b64_smollm2_pallas", sample(b64, cfg_smol_pallas), 180, typical_s=30),
        # Only when time is left (nothing reserved for them): SFT with the Mosaic GPU backward too (auto with
        # mgpu_bwd=1: the self-check then checks that backward as well), the XLA sampler row, the length sweep.
        Section("train_seq4096_mosaic_bwd", train([]), 600 if small else 120, typical_s=0,
                env={"DITTO_ATTN_BLOCKS": "mgpu_bwd=1"}),
        Section("sample_b64_smollm2_xla", sample(b64, cfg_smol_xla), 180, typical_s=0),
        Section("kernels_bench", cli + ["kernels", *length_sweep, "--isolate", "restart", "--json", "--out-dir",
                                        str(sweep_dir)], 300, typical_s=0, takes_budget=True,
                result_file=str(sweep_dir / "kernels.json"), add_tuned_impl=not small, drop_hung=True),
    ]


def _tuned_spec(report: dict[str, Any]) -> str | None:
    """The fastest flash spec the tuning sweep measured (None when it did not run or measured none)."""
    res = (report["sections"].get("kernels_tune") or {}).get("result") or {}
    return (res.get("summary") or {}).get("recommended")


def _command(sec: Section, report: dict[str, Any], budget: float | None) -> list[str]:
    """The section's command with its run-time additions (a sweep's --budget, the tuned spec)."""
    cmd = list(sec.cmd)
    if sec.add_tuned_impl and (spec := _tuned_spec(report)) and "--impls" in cmd:
        i = cmd.index("--impls") + 1
        if spec not in cmd[i].split(","):
            cmd[i] = f"{cmd[i]},{spec}"
    if sec.drop_hung and (hung := _hung_pairs(report)):
        cmd += ["--skip-flash", ",".join(f"{b}:{'causal' if c else 'noncausal'}" for b, c in sorted(hung))]
    if sec.takes_budget and budget is not None:
        cmd += ["--budget", f"{budget:.0f}"]
    return cmd


def _hung_pairs(report: dict[str, Any]) -> set[tuple[str, bool]]:
    """``(lowering, causal)`` of the flash correctness cases that really hung (ran past their case limit; not
    those never reached or not run): the sweep skips that lowering at that mask only, and runs the rest.
    (The 2026-12-04 lease dropped every Pallas variant because one non-causal Triton case timed out and the
    cases never reached were counted as hung too.)"""
    from ditto_jax.bench.kernel_tuning import LOWERINGS

    res = (report["sections"].get("kernels_check") or {}).get("result") or {}
    return {(e["backend"], bool(e.get("causal", "noncausal" not in e.get("name", ""))))
            for e in res.get("entries", []) if e.get("status") == "timeout" and e.get("kind") == "flash"
            and str(e.get("error", "")).startswith("no result") and e.get("backend") in LOWERINGS}


def _runs_hung(impl: str, hung: set[str]) -> bool:
    """Whether a flash impl spec runs a lowering in ``hung`` (``kernel_tuning.runs_lowering``)."""
    from ditto_jax.bench.kernel_tuning import runs_lowering

    return runs_lowering(impl, hung)


def _with_time_flag(sec: Section, cmd: list[str], limit: float) -> list[str]:
    """Tell a section that keeps its own time (``time_flag``) to finish 10 s inside its limit."""
    return cmd + [sec.time_flag, f"{max(limit - 10.0, 5.0):.0f}"] if sec.time_flag else cmd


def plan_limit(secs: list[Section], index: int, time_left: float | None,
               wanted: set[str] | None) -> tuple[float, float | None]:
    """``(time limit, sweep budget or None)`` for ``secs[index]`` with ``time_left`` seconds in the run.

    A sweep leaves the later sections' typical time untouched and keeps ``SWEEP_GRACE_S`` between its own
    budget and its limit; without a run budget, its budget is its limit less the grace.
    """
    sec = secs[index]
    limit = sec.timeout
    if time_left is not None:
        limit = min(limit, time_left)
        if sec.takes_budget:
            later = sum(s.typical_s for s in secs[index + 1:] if wanted is None or s.name in wanted)
            limit = min(limit, time_left - later)
    budget = max(limit - SWEEP_GRACE_S, 0.0) if sec.takes_budget else None
    return limit, budget


def main(argv: list[str] | None = None) -> int:
    """Run every section and write the gathered JSON and markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks"))
    ap.add_argument("--small", action="store_true", help="CPU smoke run with tiny shapes")
    ap.add_argument("--scratch", default=None,
                    help="folder for generated configs and the length sweep's files (default: a new temporary one)")
    ap.add_argument("--only", default=None, help="comma list of section names")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run: each section's limit is cut to what is left")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.scratch is None:
        import tempfile

        args.scratch = tempfile.mkdtemp(prefix="gpu_check_")
    device = _device_name()
    date = dt.date.today().isoformat()
    report: dict[str, Any] = {"device": device, "date": date, "host": os.uname().nodename, "budget_s": args.budget,
                              "sections": {}}
    (out_dir / "sections.log").unlink(missing_ok=True)
    secs = sections(args.small, out_dir, Path(args.scratch))
    wanted = set(args.only.split(",")) if args.only else None
    unknown = (wanted or set()) - {s.name for s in secs}
    if unknown:
        ap.error(f"--only: unknown sections {sorted(unknown)}; known: {[s.name for s in secs]}")
    slug = device.lower().replace("nvidia ", "").replace(" ", "-")
    stem = out_dir / f"gpu-{slug}-{date}"
    deadline = time.time() + args.budget if args.budget else None
    for index, sec in enumerate(secs):
        if wanted and sec.name not in wanted:
            continue
        limit, budget = plan_limit(secs, index, None if deadline is None else deadline - time.time(), wanted)
        if limit < 20 or (budget is not None and budget < 5):
            report["sections"][sec.name] = {"returncode": None, "error": ["skipped: run budget spent"]}
        else:
            cmd = _with_time_flag(sec, _command(sec, report, budget), limit)
            report["sections"][sec.name] = _run(sec.name, cmd, limit, out_dir, sec.result_file, sec.env)
        # Written after every section, so a run cut short still leaves what it measured.
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
    print(json.dumps({"written": str(stem) + ".{json,md}", "ok": all(
        s.get("returncode") == 0 for s in report["sections"].values())}))
    return 0


def markdown(report: dict[str, Any]) -> str:
    """A compact table (one row per section with its headline figures), then each sweep's goals table."""
    from ditto_jax.bench.kernel_tuning import goals_markdown

    lines = [f"# GPU measurement — {report['device']} — {report['date']}", "",
             "| section | status | seconds | headline |", "|---|---|---|---|"]
    goal_tables: list[str] = []
    check_notes: list[str] = []
    for name, sec in report["sections"].items():
        res = sec.get("result") or {}
        keys = [k for k in ("tokens_per_s", "train_mfu", "train_step_s", "pct_of_roofline", "tflops", "mfu",
                            "roofline_fraction", "gbps", "passed", "failed", "match", "errors", "skipped") if k in res]
        head = ", ".join(f"{k}={res[k]}" for k in keys)
        summ = res.get("summary")
        if isinstance(summ, dict) and "goals" in summ:  # a kernel sweep
            head += f"{', ' if head else ''}goals met {summ['met']} of {len(summ['goals'])}"
            goal_tables.append(f"### {name}\n\n" + goals_markdown(summ).replace("## Goals", "Goals", 1))
        elif isinstance(summ, dict):  # the correctness check: pass / fail / error counts, then what did not pass
            head += (", " if head else "") + ", ".join(f"{k}={v}" for k, v in summ.items())
            check_notes.extend(_check_notes(res))
        if not head and sec.get("error"):
            head = "; ".join(sec["error"])
        status = "ok" if sec.get("returncode") == 0 else ("partial" if sec.get("result_from_file") else "FAIL")
        if sec.get("kernel_warnings"):
            head += f" (warned: {'; '.join(sec['kernel_warnings'])[:300]})"
        lines.append(f"| {name} | {status} | {sec.get('seconds')} | {head} |")
    if check_notes:
        goal_tables.insert(0, "### kernels_check: entries that did not pass, and auto's lowering\n\n"
                           + "\n".join(check_notes) + "\n")
    return "\n".join(lines + [""] + goal_tables) + "\n"


def _check_notes(res: dict[str, Any]) -> list[str]:
    """One line per correctness entry that did not pass, and per ``auto`` entry the lowering it used."""
    notes = []
    for e in res.get("entries", []):
        what = f"- {e.get('kind')} `{e.get('backend')}` {e.get('name')}: {e.get('status')}"
        if e.get("status") in ("fail", "error", "timeout"):
            detail = e.get("errors") or e.get("error") or ""
            notes.append(f"{what} {str(detail)[:300]}")
        elif e.get("auto_lowering"):
            notes.append(f"{what}, auto used {e['auto_lowering']}")
    return notes


if __name__ == "__main__":
    sys.exit(main())
