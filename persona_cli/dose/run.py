"""Running the cells of a dose sweep: one after another, or one per GPU at a time.

The caller supplies `invoke(argv, gpu) -> exit code`, which runs one `persona-cli` command
(in-process on a CPU machine; as a subprocess with CUDA_VISIBLE_DEVICES=gpu on a pod). A cell
holds a lock while it runs, so `dose-sweep status` can tell running from missing cells; a cell
whose evaluation is DONE is skipped, and a cell whose training is DONE goes straight to its
evaluation, so a killed sweep resumes where it stopped. A cell that crashes is recorded and
the others go on: an overnight sweep should not stop at the first bad cell. A cell refused for
bad input (exit 2) stops the sweep instead, since every other cell would be refused the same way.
"""

from __future__ import annotations

import fcntl
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from persona_cli.dose.plan import Cell, lock_path
from persona_cli.errors import EXIT_BAD_INPUT
from persona_cli.rundir import is_done

Invoke = Callable[[tuple[str, ...], str | None], int]


@dataclass(frozen=True)
class CellOutcome:
    cell: str
    ok: bool
    skipped: bool
    stage: str  # "train", "eval" or "" when skipped
    exit_code: int


def _run_cell(cell: Cell, invoke: Invoke, gpu: str | None) -> CellOutcome:
    if cell.done:
        return CellOutcome(cell.name, True, True, "", 0)
    cell.path.mkdir(parents=True, exist_ok=True)
    with open(lock_path(cell), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if cell.train_argv is not None and not is_done(cell.path / "train"):
                code = invoke(cell.train_argv, gpu)
                if code != 0:
                    return CellOutcome(cell.name, False, False, "train", code)
            code = invoke(cell.eval_argv, gpu)
            return CellOutcome(cell.name, code == 0, False, "eval", code)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_cells(
    cells: list[Cell],
    invoke: Invoke,
    *,
    gpus: list[str] | None = None,
    on_done: Callable[[CellOutcome], None] | None = None,
) -> list[CellOutcome]:
    """Run every unfinished cell; with `gpus`, one cell per GPU at a time."""
    outcomes: list[CellOutcome] = []

    def finish(outcome: CellOutcome) -> None:
        outcomes.append(outcome)
        if on_done is not None:
            on_done(outcome)

    if not gpus:
        for cell in cells:
            finish(_run_cell(cell, invoke, None))
            if outcomes[-1].exit_code == EXIT_BAD_INPUT:
                break
        return outcomes
    free: queue.Queue[str] = queue.Queue()
    for g in gpus:
        free.put(g)

    refused = False

    def on_gpu(cell: Cell) -> CellOutcome:
        nonlocal refused
        if refused:
            return CellOutcome(cell.name, False, True, "", EXIT_BAD_INPUT)
        gpu = free.get()
        try:
            outcome = _run_cell(cell, invoke, gpu)
            refused |= outcome.exit_code == EXIT_BAD_INPUT
            return outcome
        finally:
            free.put(gpu)

    with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        for outcome in pool.map(on_gpu, cells):
            finish(outcome)
    return outcomes
