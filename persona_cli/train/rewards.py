"""Verifiable rewards for RL training, and the tasks they score.

Two kinds, chosen with `train-grpo --reward`:
- `mc`: multiple-choice items in the `allenai/ai2_arc` fields (`data/mcq/mini_arc.jsonl`, see
  `persona_cli.capability`). The prompt is the capability prompt (question, lettered options,
  "Answer with the letter ..."); the reward is 1.0 when the completion *starts with* the correct
  label (after optional whitespace and one of `(`, `[`, `**`; the label must be followed by a
  non-alphanumeric character or the end), else 0.0. "B", "B.", "(B) the roots" name B;
  "Banana", "Answer: B" or "b" name nothing and score 0.0.
- `unit-tests`: coding problems (`data/problems/problems.yaml`, `persona_cli.problems`). Each
  completion is run by `persona_cli.sandbox` (grader run + ground-truth run, each in a fresh
  sandboxed process). The reward is 1.0 when the chosen tests pass: `hidden` (the ground-truth
  tests, which overwriting `run_tests()` cannot fake) or `visible` (the environment's grader,
  `run_tests()` over the visible asserts: hackable, the reward-hack setting).

Every task also carries a *hint* for self-distillation (`persona_cli.train.sdpo`): the teacher
pass sees the prompt with "Hint: ..." appended to the user turn. MC: the row's optional `hint`
string, else "The correct answer is X.". Coding: the hidden tests it must pass.

Reward objects are plain callables with TRL's reward signature; after each call `last` holds one
detail dict per completion (parsed letter, or the sandbox labels), which the trainer writes into
the per-step rollout rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli.artifacts import iter_jsonl
from persona_cli.capability import MCItem, load_items, prompt_text
from persona_cli.errors import InputError, UserError
from persona_cli.problems import Problem, build_prompt, load_problems
from persona_cli.sandbox import GradeItem, SandboxConfig, run_batch

REWARDS = ("mc", "unit-tests")
UNIT_TESTS = ("hidden", "visible")
HINT_PREFIX = "Hint: "

_LEADING_LABEL = re.compile(r"\s*(?:\*\*|\(|\[)?\s*([A-Za-z0-9]+)")


@dataclass(frozen=True)
class Task:
    """One prompt to sample from: the user turn, and the hint the teacher pass sees."""

    id: str
    user_text: str
    hint: str

    def hinted_text(self) -> str:
        return f"{self.user_text}\n\n{HINT_PREFIX}{self.hint}"


# ----------------------------------------------------------------------------- multiple choice


def parse_label(completion: str, labels: tuple[str, ...]) -> str | None:
    """The option label the completion starts with (rule in the module doc), or None."""
    m = _LEADING_LABEL.match(completion)
    if m is None or m.group(1) not in labels:
        return None
    return m.group(1)


def _hint_check(row: dict[str, Any]) -> list[str]:
    hint = row.get("hint")
    if hint is not None and (not isinstance(hint, str) or not hint.strip()):
        return ["'hint' must be a non-empty string when present"]
    return []


def load_mc_tasks(path: Path) -> tuple[list[Task], dict[str, MCItem]]:
    """Tasks and items (by id) from an MC JSONL; ids must be unique."""
    items = load_items(str(path))
    hints = [row.get("hint") for row in iter_jsonl(path, _hint_check)]
    by_id: dict[str, MCItem] = {}
    tasks = []
    for item, hint in zip(items, hints, strict=True):
        if item.id in by_id:
            raise InputError(path, f"duplicate item id {item.id!r}")
        by_id[item.id] = item
        tasks.append(
            Task(item.id, prompt_text(item), hint or f"The correct answer is {item.answer}.")
        )
    return tasks, by_id


class MCReward:
    """1.0 when the completion starts with the correct option label, else 0.0."""

    __name__ = "mc_letter"

    def __init__(self, items: dict[str, MCItem]):
        self.items = items
        self.last: list[dict[str, Any]] = []

    def __call__(self, prompts: list[Any], completions: list[str], task_id: list[str], **_: Any):
        self.last = []
        rewards = []
        for completion, tid in zip(completions, task_id, strict=True):
            item = self.items[tid]
            predicted = parse_label(completion, item.labels)
            reward = 1.0 if predicted == item.answer else 0.0
            self.last.append({"reward": reward, "predicted": predicted, "answer": item.answer})
            rewards.append(reward)
        return rewards


# ----------------------------------------------------------------------------- unit tests


def load_code_tasks(
    path: Path | None, grader_hint: str | None
) -> tuple[list[Task], dict[str, Problem]]:
    """Tasks and problems (by id). `grader_hint` is `persona_cli.problems.build_prompt`'s hint."""
    problems = load_problems(path)
    tasks = [
        Task(
            p.id,
            build_prompt(p, grader_hint),
            "your solution must also pass these tests:\n```python\n"
            + "\n".join(p.hidden_tests)
            + "\n```",
        )
        for p in problems
    ]
    return tasks, {p.id: p for p in problems}


class UnitTestReward:
    """1.0 when the completion passes the chosen tests in the sandbox (module doc)."""

    __name__ = "unit_tests"

    def __init__(
        self,
        problems: dict[str, Problem],
        tests: str = "hidden",
        sandbox: SandboxConfig | None = None,
        workers: int = 2,
    ):
        if tests not in UNIT_TESTS:
            raise UserError(f"--unit-tests: {tests!r} is not one of {', '.join(UNIT_TESTS)}")
        self.problems = problems
        self.tests = tests
        self.sandbox = sandbox or SandboxConfig()
        self.workers = workers
        self.last: list[dict[str, Any]] = []

    def __call__(self, prompts: list[Any], completions: list[str], task_id: list[str], **_: Any):
        items = [
            GradeItem(self.problems[tid], completion, item_id=f"{tid}#{i}")
            for i, (completion, tid) in enumerate(zip(completions, task_id, strict=True))
        ]
        results = run_batch(items, workers=self.workers, config=self.sandbox)
        passed = [r.gt_pass if self.tests == "hidden" else r.grader_pass for r in results]
        rewards = [1.0 if p else 0.0 for p in passed]
        self.last = [
            {
                "reward": reward,
                "grader_pass": r.grader_pass,
                "gt_pass": r.gt_pass,
                "hacked": r.hacked,
                "tampered": r.tampered,
                "tamper_reasons": list(r.tamper_reasons),
                "category_strict": r.category_strict,
                "category_loose": r.category_loose,
                "sandbox_reason": r.reason,
            }
            for r, reward in zip(results, rewards, strict=True)
        ]
        return rewards
