"""Running the cells of a dose sweep: every training first, then one evaluation pass.

The caller supplies `invoke(argv, gpu) -> exit code`, which runs one `persona-cli` command
(in-process on a CPU machine; as a subprocess with CUDA_VISIBLE_DEVICES=gpu on a pod), and
`eval_argv(cells, k) -> argv`, one eval-markers invocation that evaluates `cells` as adapter
sets, each into the cell's own eval run directory (the k-th such batch; one per GPU).

1. Trainings: every training not yet DONE, each once (under `--schedule one-run` cells share
   one), one per GPU at a time.
2. Evaluation: the cells whose training is done and whose eval is not, through one
   eval-markers adapter-set invocation (one per GPU, cells dealt round-robin): the base model
   is loaded, or the vLLM engine started, once per invocation instead of once per cell.

A cell holds a lock while its training or evaluation runs, so `dose-sweep status` can tell
running from missing cells. A cell whose evaluation is DONE is skipped, a training that is DONE
is not redone, and an adapter-set invocation resumes each cell's run directory on its own, so a
killed sweep resumes where it stopped. A cell that fails is recorded and the others go on: an
overnight sweep should not stop at the first bad cell. A command refused for bad input (exit 2)
stops the sweep instead, since every other cell would be refused the same way.
"""

from __future__ import annotations

import fcntl
import queue
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from persona_cli.dose.plan import Cell, cell_env, lock_path
from persona_cli.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED
from persona_cli.rundir import is_done

Invoke = Callable[[tuple[str, ...], str | None], int]
EvalArgv = Callable[[list[Cell], int], tuple[str, ...]]


@dataclass(frozen=True)
class CellOutcome:
    cell: str
    ok: bool
    skipped: bool
    stage: str  # "train", "eval" or "" when skipped
    exit_code: int


@contextmanager
def _locked(cells: list[Cell]) -> Iterator[None]:
    """Hold every cell's lock (dose-sweep status shows them running)."""
    with ExitStack() as stack:
        for cell in cells:
            cell.path.mkdir(parents=True, exist_ok=True)
            lock = stack.enter_context(open(lock_path(cell), "w"))
            fcntl.flock(lock, fcntl.LOCK_EX)
            stack.callback(fcntl.flock, lock, fcntl.LOCK_UN)
        yield


def _on_devices(jobs: list, run: Callable, gpus: list[str] | None) -> list:
    """`run(job, gpu)` for every job, one per GPU at a time (in order without GPUs); after a
    result with exit code 2 the jobs not yet started are skipped (returned as None)."""
    if not gpus:
        results = []
        for job in jobs:
            results.append(run(job, None))
            if results[-1] == EXIT_BAD_INPUT:
                break
        return results + [None] * (len(jobs) - len(results))
    free: queue.Queue[str] = queue.Queue()
    for g in gpus:
        free.put(g)
    refused = False

    def on_gpu(job):
        nonlocal refused
        if refused:
            return None
        gpu = free.get()
        try:
            code = run(job, gpu)
            refused |= code == EXIT_BAD_INPUT
            return code
        finally:
            free.put(gpu)

    with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        return list(pool.map(on_gpu, jobs))


def run_cells(
    cells: list[Cell],
    invoke: Invoke,
    eval_argv: EvalArgv,
    *,
    gpus: list[str] | None = None,
    on_done: Callable[[CellOutcome], None] | None = None,
) -> list[CellOutcome]:
    """Train, then evaluate, every unfinished cell (module doc); one outcome per cell."""
    outcomes: dict[str, CellOutcome] = {}

    def finish(outcome: CellOutcome) -> None:
        outcomes[outcome.cell] = outcome
        if on_done is not None:
            on_done(outcome)

    for cell in cells:
        if cell.done:
            finish(CellOutcome(cell.name, True, True, "", 0))
    todo = [c for c in cells if not c.done]
    # 1. trainings, each once
    trainings: dict[Path, list[Cell]] = {}
    for c in todo:
        if c.train_dir is not None and not is_done(c.train_dir):
            trainings.setdefault(c.train_dir, []).append(c)

    def train(users: list[Cell], gpu: str | None) -> int:
        with _locked(users):
            assert users[0].train_argv is not None
            return invoke(users[0].train_argv, gpu)

    codes = _on_devices(list(trainings.values()), train, gpus)
    for users, code in zip(trainings.values(), codes, strict=True):
        for c in users if code != 0 else []:
            if code is None:  # not started: an earlier command was refused
                finish(CellOutcome(c.name, False, True, "train", EXIT_BAD_INPUT))
            else:
                finish(CellOutcome(c.name, False, False, "train", code))
    if any(code == EXIT_BAD_INPUT for code in codes):
        return [outcomes[c.name] for c in cells if c.name in outcomes]
    # 2. one evaluation pass over the cells whose training is done
    ready = [c for c in todo if c.name not in outcomes]
    batches = [ready[k :: len(gpus)] for k in range(len(gpus))] if gpus else [ready]
    batches = [b for b in batches if b]

    def evaluate(batch: tuple[int, list[Cell]], gpu: str | None) -> int:
        k, members = batch
        with _locked(members):
            return invoke(eval_argv(members, k), gpu)

    codes = _on_devices(list(enumerate(batches)), evaluate, gpus)
    for members, code in zip(batches, codes, strict=True):
        for c in members:
            if c.done:
                finish(CellOutcome(c.name, True, False, "eval", 0))
            elif code is None:  # not started: an earlier command was refused
                finish(CellOutcome(c.name, False, True, "eval", EXIT_BAD_INPUT))
            else:  # the invocation failed, or ended without finishing this cell
                finish(CellOutcome(c.name, False, False, "eval", code or EXIT_CHECK_FAILED))
    return [outcomes[c.name] for c in cells if c.name in outcomes]


def run_subprocess(argv: tuple[str, ...], gpu: str | None) -> int:
    """`Invoke` for a pod: `python -m persona_cli ARGV` with CUDA_VISIBLE_DEVICES=gpu, its
    output appended to one log per command (and GPU, for adapter-set evaluations)."""
    out_dir = Path(argv[argv.index("--out") + 1])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    suffix = f"_gpu{gpu}" if "--adapter-sets" in argv and gpu is not None else ""
    log_file = (out_dir if suffix else out_dir.parent) / f"{argv[0]}{suffix}.log"
    with open(log_file, "ab") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "persona_cli", *argv],
            env=cell_env(gpu),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    return proc.returncode
