"""``ditto-jax bench simulate``: the real sampling workload of Ditto's response simulation, whole-process timed.

N characters x Q questions: each prompt is the character's profile system prompt (from the embedded knowledge
base, shortened to ``--profile-intro-chars`` / ``--profile-claims``, ~300 tokens for SmolLM2 by default) plus one
question, so a character's Q prompts share a long prefix, as in the simulation. The paper's decoding
(temperature 0.7, top-p 0.8, repetition penalty 1.1), ``--new-tokens`` new tokens, ``--batch`` rows.

Both sides run as fresh processes on the same Hugging Face folder (a GGUF file, model checkpoint or random
preset is first written as one) and the same token-id prompts, and are timed from process start to exit:
``ditto-jax sample`` (its own summary gives the compile / prefill / decode split and the prefix-cache hit
rate) and, with ``--compare-hf``, a transformers ``generate`` loop over the same prompts in batches of
``--batch`` (left padded, stopping at the same end tokens). Runs alternate ours/theirs ``--repeats`` times;
the first of ours may fill the persistent compilation cache: each of ours is labelled ``cold`` (it compiled
something) or ``warm`` (it loaded every executable from the cache) from its own counters, and the ``*_warm``
figures use the warm runs alone (``note`` says when the plain medians mix both). Each run reports wall and CPU
seconds (user + system of the process); on a machine shared with other jobs the CPU-time ratio is the steadier
figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ditto_jax.fileio import atomic_write_json
from ditto_jax.malloc import user_environment

QUESTIONS = (
    "What was the hardest decision you ever had to make?",
    "Who do you trust the most, and why?",
    "What do you think of the people who opposed you?",
    "How would you like to be remembered?",
    "What does a good day look like for you?",
    "What is the greatest lesson your life has taught you?",
    "Which place do you love the most?",
    "What do you fear?",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``bench simulate``."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face folder, GGUF file or model checkpoint")
    src.add_argument("--config", help="random-init model preset (e.g. model/tiny)")
    p.add_argument("--characters", type=int, default=8)
    p.add_argument("--questions", type=int, default=4, help=f"per character (at most {len(QUESTIONS)})")
    p.add_argument("--lang", default="en", help="characters of this language from the knowledge base")
    p.add_argument("--profile-intro-chars", type=int, default=100)
    p.add_argument("--profile-claims", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each side (alternating)")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers generate (whole process)")
    p.add_argument("--sample-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `ditto-jax sample` (repeatable, e.g. --sample-arg=--no-prefix-cache)")
    p.add_argument("--ours-reads", choices=("source", "folder"), default="source",
                   help="what ditto-jax sample loads: the model as named (a GGUF file is read as such, its blocks "
                        "kept for decoding; default) or the float32 HF folder transformers loads")
    p.add_argument("--workdir", default=None, help="where prompts, outputs and the HF folder go (default: temp)")


def build_prompts(tokenizer: Any, characters: int, questions: int, lang: str, intro_chars: int,
                  claims: int) -> list[dict[str, Any]]:
    """``[{"id", "input_ids"}]``: ``characters`` x ``questions`` chat prompts, a character's prompts adjacent."""
    from ditto_jax.data.characters import default_characters
    from ditto_jax.simulation.prompts import ProfileBudget, response_messages

    chars = [c for c in default_characters() if c.lang == lang][:characters]
    if len(chars) < characters:
        raise SystemExit(f"error: the knowledge base has {len(chars)} characters of language {lang!r}")
    if not 1 <= questions <= len(QUESTIONS):
        raise SystemExit(f"error: --questions must be in 1..{len(QUESTIONS)}")
    out = []
    for c in chars:
        for i, q in enumerate(QUESTIONS[:questions]):
            ids = tokenizer.encode_chat(response_messages(c, q, (), ProfileBudget(intro_chars, claims)),
                                        add_generation_prompt=True)[0]
            out.append({"id": f"{c.id}/q{i}", "input_ids": [int(t) for t in ids]})
    return out


def _hf_folder(args: argparse.Namespace, work: Path) -> tuple[str, Any]:
    """``(HF folder, tokenizer)``: the model as a Hugging Face folder both sides load."""
    from ditto_jax.checkpoints import ModelSource, load_model_source

    src = ModelSource(path=args.model, config=args.config)
    if args.model and os.path.exists(os.path.join(args.model, "config.json")) and any(
            Path(args.model).glob("*.safetensors")):
        from ditto_jax.checkpoints import source_tokenizer

        return args.model, source_tokenizer(src)
    from ditto_jax import hf

    model, cfg, tokenizer = load_model_source(src)
    folder = work / "hf-model"
    if not (folder / "config.json").exists():
        hf.save_pretrained(model, cfg, folder, tokenizer=tokenizer)
    return str(folder), tokenizer


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[dict[str, float], str]:
    """Run a command; ``({"wall_s", "cpu_s"}, stdout)`` (CPU: user + system of the child, all its threads)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}, proc.stdout


def _last_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"error: no JSON summary in the output:\n{stdout[-2000:]}")


def _save_partial(args: argparse.Namespace, ours: list, hf: list) -> None:
    """The runs so far, next to the final result (a long benchmark on a busy machine can be read mid-way)."""
    if args.out:
        atomic_write_json(str(args.out) + ".partial", {"ours_runs": ours, "hf_runs": hf}, indent=1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the workload, time both sides, return the JSON result."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-simulate-"))
    work.mkdir(parents=True, exist_ok=True)
    folder, tokenizer = _hf_folder(args, work)
    if tokenizer is None:
        raise SystemExit(f"error: {folder}: the workload needs a tokenizer (chat prompts)")
    prompts = build_prompts(tokenizer, args.characters, args.questions, args.lang, args.profile_intro_chars,
                            args.profile_claims)
    prompt_file = work / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    stop_ids = sorted(set(getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id]))
    decoding = ["--temperature", str(args.temperature), "--top-p", str(args.top_p),
                "--repetition-penalty", str(args.repetition_penalty), "--max-new-tokens", str(args.new_tokens),
                "--seed", str(args.seed)]
    env = dict(os.environ)  # ours: this program's own environment (its allocator settings: ditto_jax.malloc)
    hf_env = user_environment(os.environ)  # transformers: the environment its user started the benchmark with
    ours_model = args.model if args.model and args.ours_reads == "source" else folder
    ours_runs, hf_runs = [], []
    for r in range(args.repeats):
        out = work / f"ours-{r}"
        cmd = [sys.executable, "-m", "ditto_jax.cli", "sample", "--model", ours_model, "--prompts", str(prompt_file),
               "--out", str(out), "--batch-size", str(args.batch), "--no-progress", *decoding, *args.sample_arg]
        if out.exists():
            import shutil

            shutil.rmtree(out)
        times, stdout = _timed(cmd, env)
        ours_runs.append({**times, **_last_json(stdout)})
        _save_partial(args, ours_runs, hf_runs)
        if args.compare_hf:
            cmd = [sys.executable, "-m", "ditto_jax.bench.simulate", "--hf-worker", folder, str(prompt_file),
                   str(work / f"hf-{r}.jsonl"), str(args.batch), json.dumps({
                       "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
                       "repetition_penalty": args.repetition_penalty, "max_new_tokens": args.new_tokens,
                       "stop_ids": stop_ids})]
            times, stdout = _timed(cmd, hf_env)
            hf_runs.append({**times, **_last_json(stdout)})
            _save_partial(args, ours_runs, hf_runs)
    lengths = [len(p["input_ids"]) for p in prompts]
    for r in ours_runs:
        r["compilation_cache"] = _cache_state(r)
    warm = [r for r in ours_runs if r["compilation_cache"] == "warm"]
    ours_wall = statistics.median(r["wall_s"] for r in ours_runs)
    ours_cpu = statistics.median(r["cpu_s"] for r in ours_runs)
    result: dict[str, Any] = {
        "bench": "simulate", "model": args.model or args.config, "hf_folder": folder, "ours_model": ours_model,
        "prompts": len(prompts), "characters": args.characters, "questions": args.questions,
        "prompt_tokens": sum(lengths), "prompt_len_min": min(lengths), "prompt_len_max": max(lengths),
        "new_tokens": args.new_tokens, "batch": args.batch,
        "sampling": {"temperature": args.temperature, "top_p": args.top_p,
                     "repetition_penalty": args.repetition_penalty},
        "ours_wall_s": round(ours_wall, 2), "ours_cpu_s": round(ours_cpu, 2),
        "ours_warm_wall_s": round(statistics.median(r["wall_s"] for r in warm), 2) if warm else None,
        "ours_cold_runs": sum(r["compilation_cache"] == "cold" for r in ours_runs), "ours_runs": ours_runs,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "glibc_tunables": {"ours": env.get("GLIBC_TUNABLES"), "hf": hf_env.get("GLIBC_TUNABLES")},
    }
    if hf_runs:
        hf_wall = statistics.median(r["wall_s"] for r in hf_runs)
        hf_cpu = statistics.median(r["cpu_s"] for r in hf_runs)
        result.update({"hf_wall_s": round(hf_wall, 2), "hf_cpu_s": round(hf_cpu, 2), "hf_runs": hf_runs,
                       "speedup_vs_hf": round(hf_wall / ours_wall, 2),
                       "speedup_vs_hf_cpu_time": round(hf_cpu / ours_cpu, 2),
                       "speedup_vs_hf_per_run": [round(h["wall_s"] / o["wall_s"], 2)
                                                 for o, h in zip(ours_runs, hf_runs)]})
        if warm:
            result["speedup_vs_hf_warm"] = round(hf_wall / result["ours_warm_wall_s"], 2)
    if result["ours_cold_runs"] and warm:
        result["note"] = ("ours_wall_s and speedup_vs_hf are medians over runs that compiled into an empty or stale "
                          "compilation cache (cold) and runs that loaded every executable from it (warm); the "
                          "*_warm figures are the warm runs alone")
    elif result["ours_cold_runs"]:
        result["note"] = "every run of ours compiled into an empty or stale compilation cache (cold): no warm figure"
    return result


def table(result: dict[str, Any]) -> str:
    """The result as markdown: the two sides' whole-process times and ratios, then each of our runs split by
    phase (the phases come from ``ditto-jax sample``'s own summary; ``other`` is the rest of the process:
    interpreter start-up, imports, writing the output)."""
    hf = result.get("hf_runs") or []

    def runs(rs: list[dict[str, Any]], key: str) -> str:
        return ", ".join(f"{r[key]:.1f}" for r in rs)

    lines = ["| | ours (`ditto-jax sample`) | transformers `generate` | ratio |", "|---|---:|---:|---:|",
             f"| wall s, median (runs) | {result['ours_wall_s']:.1f} ({runs(result['ours_runs'], 'wall_s')}) | "
             + (f"{result['hf_wall_s']:.1f} ({runs(hf, 'wall_s')}) | **{result['speedup_vs_hf']:.2f}x** |" if hf
                else "| |")]
    if result.get("ours_warm_wall_s") is not None:
        lines.append(f"| wall s, warm runs only | {result['ours_warm_wall_s']:.1f} | "
                     + (f"{result['hf_wall_s']:.1f} | {result['speedup_vs_hf_warm']:.2f}x |" if hf else "| |"))
    lines.append(f"| CPU s, median | {result['ours_cpu_s']:.1f} | "
                 + (f"{result['hf_cpu_s']:.1f} | {result['speedup_vs_hf_cpu_time']:.2f}x |" if hf else "| |"))
    # the same prompts and decoding, but each side samples its own tokens: their lengths differ
    lines.append("| generated tokens (runs) | " + ", ".join(str(r["generated_tokens"]) for r in result["ours_runs"])
                 + " | " + ", ".join(str(r["generated_tokens"]) for r in hf) + " | |")
    lines += ["", "| our run | compilation cache | load | compile | prefix fill | prefill | decode (steps, ms a step) "
              "| other | wall | prompt tokens from the prefix cache |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(result["ours_runs"]):
        e = r["engine"]
        phases = r["load_s"] + e["compile_s"] + e["prefix_fill_s"] + e["prefill_s"] + e["decode_s"]
        step = 1e3 * e["decode_s"] / e["decode_steps"] if e["decode_steps"] else 0.0
        hit = f"{100 * r['prefix_cache']['token_hit_rate']:.0f}%" if r.get("prefix_cache") else "off"
        lines.append(f"| {i} | {r['compilation_cache']} | {r['load_s']:.1f} | {e['compile_s']:.1f} | "
                     f"{e['prefix_fill_s']:.1f} | {e['prefill_s']:.1f} | {e['decode_s']:.1f} ({e['decode_steps']}, "
                     f"{step:.0f}) | {r['wall_s'] - phases:.1f} | {r['wall_s']:.1f} | {hit} |")
    tunables = result.get("glibc_tunables") or {}
    side = {k: f"`{tunables[k]}`" if tunables.get(k) else "the system's" for k in ("ours", "hf")}
    lines += ["", f"glibc allocator settings (`GLIBC_TUNABLES`): ours {side['ours']}, transformers {side['hf']} "
              "(`ditto_jax.malloc`)."]
    if result.get("note"):
        lines += ["", f"Note: {result['note']}."]
    return "\n".join(lines)


def _cache_state(run: dict[str, Any]) -> str:
    """``warm`` (every executable loaded from the persistent compilation cache), ``cold`` (some compiled) or
    ``off`` (no persistent cache): read from the run's own compile counters."""
    stats = run.get("compile", {})
    if stats.get("cache_dir") is None:
        return "off"
    return "cold" if stats.get("cache_misses", 0) else "warm"


def hf_worker(folder: str, prompt_file: str, out_file: str, batch: int, decoding: dict[str, Any]) -> None:
    """The transformers side: load the folder, ``generate`` the prompts in batches, write the outputs."""
    t_start = time.perf_counter()
    import torch
    import transformers

    torch.manual_seed(decoding["seed"])
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [json.loads(line) for line in Path(prompt_file).read_text().splitlines() if line.strip()]
    stop = decoding["stop_ids"]
    t_loaded = time.perf_counter()
    records, new_tokens = [], 0
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            part = prompts[start:start + batch]
            width = max(len(p["input_ids"]) for p in part)
            ids = torch.full((len(part), width), stop[0], dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, p in enumerate(part):
                n = len(p["input_ids"])
                ids[i, width - n:] = torch.tensor(p["input_ids"])
                mask[i, width - n:] = 1
            out = model.generate(ids, attention_mask=mask, do_sample=decoding["temperature"] > 0,
                                 temperature=decoding["temperature"], top_p=decoding["top_p"], top_k=None,
                                 repetition_penalty=decoding["repetition_penalty"],
                                 max_new_tokens=decoding["max_new_tokens"], eos_token_id=stop, pad_token_id=stop[0])
            for i, p in enumerate(part):
                row = out[i, width:].tolist()
                cut = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
                new_tokens += cut
                records.append({"id": p["id"], "output_ids": row[:cut]})
    Path(out_file).write_text("".join(json.dumps(r) + "\n" for r in records))
    end = time.perf_counter()
    print(json.dumps({"load_s": round(t_loaded - t_start, 2), "generate_s": round(end - t_loaded, 2),
                      "generated_tokens": new_tokens}))


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--hf-worker":
        hf_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), json.loads(sys.argv[6]))
    else:
        raise SystemExit("usage: python -m ditto_jax.bench.simulate --hf-worker FOLDER PROMPTS OUT BATCH DECODING")
