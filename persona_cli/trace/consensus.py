"""Teacher consensus and DPO pairs for replay-trace.

`find_consensus` takes each teacher's normalised answer (None when it gave none) and decides:
- `consensus`: one answer holds a strict plurality AND at least `quorum` of the teachers that
  answered (a fraction in (0, 1], default 0.5: more than half) agree on it;
- `tie`: two or more answers share the top count;
- `no_quorum`: a single top answer that too few teachers support;
- `no_answers`: no teacher produced an extractable answer.
Ties and no-quorum prompts are reported, never paired. `make_pair` writes a DPO pair only when
the student's normalised answer differs from the consensus: chosen = the full raw answer of the
first agreeing teacher in roster order (deterministic), rejected = the student's raw answer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Consensus:
    status: str  # "consensus", "tie", "no_quorum" or "no_answers"
    answer: str | None
    agreeing: tuple[str, ...]  # teachers whose normalised answer is the consensus
    counts: dict[str, int]  # normalised answer -> number of teachers
    answered: int  # teachers with an extractable answer

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["agreeing"] = list(self.agreeing)
        return d


def find_consensus(answers: dict[str, str | None], quorum: float = 0.5) -> Consensus:
    """`answers`: teacher name -> normalised answer, in roster order."""
    if not 0 < quorum <= 1:
        raise ValueError("quorum must be a fraction in (0, 1]")
    given = {t: a for t, a in answers.items() if a is not None}
    counts = Counter(given.values())
    if not counts:
        return Consensus("no_answers", None, (), {}, 0)
    ranked = counts.most_common()
    top, top_n = ranked[0]
    if len(ranked) > 1 and ranked[1][1] == top_n:
        return Consensus("tie", None, (), dict(counts), len(given))
    agreeing = tuple(t for t, a in given.items() if a == top)
    # Strictly more than `quorum` of those who answered (0.5 -> a true majority), or all of
    # them when quorum is 1.
    enough = top_n / len(given) > quorum or (quorum == 1 and top_n == len(given))
    if not enough:
        return Consensus("no_quorum", None, (), dict(counts), len(given))
    return Consensus("consensus", top, agreeing, dict(counts), len(given))


def make_pair(
    consensus: Consensus,
    student_normalized: str | None,
    student_raw: str,
    teacher_raw: dict[str, str],
) -> dict[str, str] | None:
    """A {chosen, rejected, chosen_teacher} pair, or None when there is nothing to learn."""
    if consensus.status != "consensus" or student_normalized == consensus.answer:
        return None
    teacher = consensus.agreeing[0]
    return {"chosen": teacher_raw[teacher], "rejected": student_raw, "chosen_teacher": teacher}
