"""Normalisation and consensus for replay-trace, on hand-written cases."""

from __future__ import annotations

import pytest

from persona_cli.trace.consensus import find_consensus, make_pair
from persona_cli.trace.normalize import (
    canonical_number,
    normalize,
    strip_thinking,
    strip_trailing_whitespace,
    unify_line_endings,
)


def test_thinking_blocks_are_removed() -> None:
    assert strip_thinking("<think>B? no, C</think>The answer is A") == "The answer is A"
    assert strip_thinking("<THINKING>x</THINKING>ok <think>y</think>done") == "ok done"
    assert strip_thinking("Answer: D <think>still reasoning, cut off") == "Answer: D "
    # template opened the block in the prompt: only the closing tag was generated
    assert strip_thinking("so it must be B\n</think>\nAnswer: C") == "\nAnswer: C"


def test_line_endings_and_trailing_whitespace() -> None:
    assert unify_line_endings("a\r\nb\rc\n") == "a\nb\nc\n"
    assert strip_trailing_whitespace("  a  \nb\t\n\n") == "a\nb"


@pytest.mark.parametrize(
    "text",
    [
        "Answer: B",
        "The answer is (B).",
        "I think **B** is right",
        "Looking at the options...\nB",
        "B. Because plants need light",
        "<think>A seems wrong</think>\r\nThe correct answer is b",
        "answer:(B)",
    ],
)
def test_multiple_choice_formats_agree(text: str) -> None:
    assert normalize(text, "mc") == "B"


def test_multiple_choice_without_a_letter_is_none() -> None:
    assert normalize("I am not sure about this one.", "mc") is None
    # Repeating the options back is not an answer (seen from SmolLM2-135M).
    assert normalize("A. evaporation\nB. condensation\nC. freezing\nD. precipitation", "mc") is None
    assert normalize("A. the flowers\n\nThe correct answer is C.", "mc") == "C"


@pytest.mark.parametrize(
    ("token", "canonical"),
    [
        ("3", "3"),
        ("3.0", "3"),
        ("3.00", "3"),
        ("1,250.50", "1250.5"),
        ("$3", "3"),
        ("1/2", "0.5"),
        ("-.75", "-0.75"),
        ("-0", "0"),
        ("100", "100"),
        ("1e", None),
    ],
)
def test_canonical_numbers(token: str, canonical: str | None) -> None:
    assert canonical_number(token) == canonical


def test_equivalent_numbers_compare_equal() -> None:
    a = normalize("Let me compute: 12 * 104 = 1248, plus 2 gives\nAnswer: 1,250.00", "number")
    b = normalize("<think>1248+2</think>The total is $1250", "number")
    c = normalize("final answer: 1250 apples (out of 2000)", "number")
    assert a == b == c == "1250"
    assert normalize("half of it: 1/2", "number") == normalize("0.50", "number") == "0.5"
    assert normalize("no digits here", "number") is None


def test_code_blocks_compare_after_dedent() -> None:
    a = normalize("Here:\n```python\n    def f(x):\n        return x  \n```\nDone.", "code")
    b = normalize("```\ndef f(x):\n    return x\n```", "code")
    assert a == b == "def f(x):\n    return x"
    two = "```python\nold()\n```\nbetter:\n```python\nnew()\n```"
    assert normalize(two, "code") == "new()"


def test_free_text() -> None:
    assert normalize("  Paris.  ", "free") == normalize("paris", "free") == "paris"
    assert normalize("The   Eiffel\nTower!", "free") == "the eiffel tower"
    with pytest.raises(ValueError, match="task type"):
        normalize("x", "essay")


def test_consensus_majority_tie_quorum_and_nothing() -> None:
    c = find_consensus({"t1": "B", "t2": "B", "t3": "C"})
    assert (c.status, c.answer, c.agreeing, c.answered) == ("consensus", "B", ("t1", "t2"), 3)
    tie = find_consensus({"t1": "B", "t2": "C", "t3": None})
    assert tie.status == "tie" and tie.answer is None and tie.counts == {"B": 1, "C": 1}
    weak = find_consensus({"t1": "A", "t2": "A", "t3": "B", "t4": "C"})
    assert weak.status == "no_quorum"  # 2 of 4 is not more than half
    assert (
        find_consensus({"t1": "A", "t2": "A", "t3": "B", "t4": "C"}, quorum=0.4).status
        == "consensus"
    )
    assert find_consensus({"t1": None, "t2": None}).status == "no_answers"
    unanimous = find_consensus({"t1": "A", "t2": "A"}, quorum=1.0)
    assert unanimous.status == "consensus"
    assert find_consensus({"t1": "A", "t2": "A", "t3": "B"}, quorum=1.0).status == "no_quorum"
    single = find_consensus({"t1": "7", "t2": None, "t3": None})
    assert single.status == "consensus" and single.answered == 1


def test_pairs_only_where_the_student_departs() -> None:
    raw = {"t1": "<think>..</think>Answer: B", "t2": "It is (B).", "t3": "C"}
    c = find_consensus({"t1": "B", "t2": "B", "t3": "C"})
    pair = make_pair(c, "C", "I pick C", raw)
    assert pair == {"chosen": raw["t1"], "rejected": "I pick C", "chosen_teacher": "t1"}
    assert make_pair(c, "B", "B", raw) is None  # agrees with consensus
    assert make_pair(c, None, "no idea", raw) is not None  # no answer at all departs too
    tie = find_consensus({"t1": "B", "t2": "C"})
    assert make_pair(tie, "A", "A", raw) is None  # ties are reported, never paired
