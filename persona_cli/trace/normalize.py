"""Answer normalisation for replay-trace: answers that agree must compare equal.

One function per step, applied in this order by `normalize`:
1. `strip_thinking`: drop `<think>...</think>` / `<thinking>...</thinking>` blocks, and an
   unclosed one that runs to the end (a reasoning model cut off mid-thought has no answer).
2. `unify_line_endings`: CRLF and CR become LF.
3. `strip_trailing_whitespace`: each line right-stripped, the whole text stripped.
4. `extract_final_answer(text, task)`, by task type:
   - `mc`: the option letter (A-J), from "Answer: B", "the answer is (B)", "**B**", or a last
     line "B" / "B. text" when it is the only lettered line (a reply that lists the options
     back answers nothing); upper-cased.
   - `number`: the final number ("Answer: 1,250.50", "$3", "1/2", "-0.75"), as a canonical
     decimal string: commas and currency signs dropped, fractions divided out, trailing zeros
     removed, so "3", "3.0" and "3.00" agree.
   - `code`: the last fenced code block (else the whole text), dedented, trailing spaces and
     blank edge lines removed.
   - `free`: case-folded, internal whitespace collapsed, trailing punctuation removed.
   Returns None when no answer of that type can be found (recorded, never guessed).
"""

from __future__ import annotations

import re
import textwrap
from decimal import Decimal, InvalidOperation
from fractions import Fraction

TASKS = ("mc", "number", "code", "free")

_THINK = re.compile(r"<(think|thinking)>.*?</\1>", re.S | re.I)
_THINK_OPEN = re.compile(r"<(think|thinking)>.*\Z", re.S | re.I)
_THINK_STRAY_CLOSE = re.compile(r"\A.*?</(think|thinking)>", re.S | re.I)
_MC_PATTERNS = (
    re.compile(r"answer\s*(?:is|:)?\s*[:\-]?\s*\(?\**([A-J])\**\)?(?![A-Za-z])", re.I),
    re.compile(r"\*\*\(?([A-J])\)?\*\*"),
    re.compile(r"(?:^|\s)\(([A-J])\)(?![A-Za-z])"),
)
_MC_LAST_LINE = re.compile(r"^\(?([A-J])(?:[\).:](?:\s|$)|$)")  # not "I am ..."
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\$?\.\d+")
_ANSWER_LINE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*(.+)", re.I)
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.S)


def strip_thinking(text: str) -> str:
    text = _THINK.sub("", text)
    text = _THINK_OPEN.sub("", text)
    # Some chat templates put the opening tag in the prompt, so only the close tag is generated.
    return _THINK_STRAY_CLOSE.sub("", text)


def unify_line_endings(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_trailing_whitespace(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def _mc(text: str) -> str | None:
    for pattern in _MC_PATTERNS:
        hits = pattern.findall(text)
        if hits:
            return hits[-1].upper()
    lines = [ln.strip().strip("*") for ln in text.split("\n") if ln.strip()]
    lettered = [m.group(1) for ln in lines if (m := _MC_LAST_LINE.match(ln))]
    # One lettered line is an answer ("B. condensation"); several are the options repeated back,
    # which answer nothing.
    if len(lettered) == 1 and _MC_LAST_LINE.match(lines[-1]):
        return lettered[0].upper()
    return None


def canonical_number(token: str) -> str | None:
    """'1,250.50' -> '1250.5', '$3.00' -> '3', '1/2' -> '0.5', '-.75' -> '-0.75'."""
    token = token.replace(",", "").replace("$", "").replace(" ", "")
    try:
        if "/" in token:
            num, den = token.split("/")
            frac = Fraction(int(num), int(den))
            value = Decimal(frac.numerator) / Decimal(frac.denominator)
        else:
            value = Decimal(token)
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None
    value = value.normalize()
    text = format(value, "f")
    return "0" if text in ("-0", "0") else text


def _number(text: str) -> str | None:
    m = _ANSWER_LINE.findall(text)
    for candidate in (m[-1] if m else None, text):
        if candidate is None:
            continue
        numbers = _NUMBER.findall(candidate)
        if numbers:
            # On an "Answer:" line the first number is the answer; in free text, the last.
            return canonical_number(numbers[0] if candidate is not text else numbers[-1])
    return None


def _code(text: str) -> str | None:
    blocks = _FENCE.findall(text)
    body = blocks[-1] if blocks else text
    body = textwrap.dedent("\n".join(line.rstrip() for line in body.split("\n"))).strip("\n")
    return body or None


def _free(text: str) -> str | None:
    out = " ".join(text.casefold().split()).rstrip(".!?;:, ")
    return out or None


_EXTRACT = {"mc": _mc, "number": _number, "code": _code, "free": _free}


def extract_final_answer(text: str, task: str) -> str | None:
    if task not in _EXTRACT:
        raise ValueError(f"task type {task!r}: choose from {', '.join(TASKS)}")
    return _EXTRACT[task](text)


def normalize(text: str, task: str) -> str | None:
    """All steps in order; None when the answer cannot be extracted."""
    cleaned = strip_trailing_whitespace(unify_line_endings(strip_thinking(text)))
    return extract_final_answer(cleaned, task)
