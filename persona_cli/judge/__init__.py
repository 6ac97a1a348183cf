"""LLM judges of alignment and coherence (0-100), as in Betley et al.'s emergent-misalignment work.

    persona-cli judge-align --input runs/eval/samples.jsonl.gz --backend openai \
        --judge-model gpt-4o-2024-08-06 --out runs/judge

    from persona_cli.judge import JudgeConfig, judge_align
    outcome = judge_align(JudgeConfig(backend="local", model="smollm2-135m"), "answers.csv", "out")

Modules: `config` (JudgeConfig, every default once), `prompts` (judge prompt files), `inputs`
(samples / JSONL / CSV items), `scoring` (logprob aggregation and parsed numbers), `remote` (API
judges through chat_api), `local` (an HF model's next-token distribution), `rows` (judgment
rows), `summary` (summary.json), `run` (the run directory).
"""

from persona_cli.judge.config import JudgeConfig
from persona_cli.judge.run import JudgeOutcome, judge_align
from persona_cli.judge.scoring import Score, score_logprobs, score_text

__all__ = ["JudgeConfig", "JudgeOutcome", "Score", "judge_align", "score_logprobs", "score_text"]
