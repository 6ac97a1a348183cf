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

from persona_cli.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "JudgeConfig": "persona_cli.judge.config",
        "JudgeOutcome": "persona_cli.judge.run",
        "judge_align": "persona_cli.judge.run",
        "Score": "persona_cli.judge.scoring",
        "score_logprobs": "persona_cli.judge.scoring",
        "score_text": "persona_cli.judge.scoring",
    },
)
