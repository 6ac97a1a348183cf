"""One `judgments` row (schema in `persona_cli.schemas.JUDGMENTS`) per (item, metric).

A judge reply becomes a row with the raw reply text or top logprobs, the parsed score or null
with a reason; a request that failed after its retries becomes an unscored row with reason
`request_failed` and the failure in `detail`. No row is ever dropped and none is scored 0 for
want of a reading.

    python -c "from persona_cli.judge.rows import judgment_row; help(judgment_row)"
"""

from __future__ import annotations

from typing import Any

from persona_cli.chat_api import ChatResult
from persona_cli.judge.config import JudgeConfig
from persona_cli.judge.inputs import JudgeItem
from persona_cli.judge.scoring import REQUEST_FAILED, Score, score_logprobs, score_text
from persona_cli.schemas import JUDGMENTS


def request_id(item: JudgeItem, metric: str) -> str:
    return f"{item.row_index}:{metric}"


def _score(result: ChatResult, config: JudgeConfig) -> Score:
    if not result.ok:
        return Score(None, REQUEST_FAILED)
    if config.scoring_mode == "parsed":
        return score_text(result.content)
    if config.backend == "local":
        # The local backend read every number token, not only the top 20.
        alternatives = result.raw["number_logprobs"]
    else:
        alternatives = result.top_logprobs[0] if result.top_logprobs else []
    return score_logprobs(alternatives, min_number_mass=config.min_number_mass)


def judgment_row(
    item: JudgeItem, metric: str, prompt_sha256: str, result: ChatResult, config: JudgeConfig
) -> dict[str, Any]:
    score = _score(result, config)
    return {
        "schema_version": JUDGMENTS.version,
        "row_index": item.row_index,
        "sample_key": item.sample_key,
        "persona": item.persona,
        "question_id": item.question_id,
        "sample_index": item.sample_index,
        "question": item.question,
        "answer": item.answer,
        "metric": metric,
        "judge_backend": config.backend,
        "judge_model": config.model,
        "response_model": result.response_model,
        "prompt_sha256": prompt_sha256,
        "scoring": config.scoring_mode,
        "score": score.score,
        "unscored_reason": score.reason,
        "detail": result.reason,
        "number_mass": score.number_mass,
        "reply": result.content,
        "top_logprobs": result.top_logprobs[0] if result.top_logprobs else None,
        "number_logprobs": (result.raw or {}).get("number_logprobs")
        if config.backend == "local"
        else None,
        "attempts": result.attempts,
        "from_cache": result.from_cache,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
    }
