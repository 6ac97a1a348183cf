"""`JudgeConfig`: every setting of a judge-align run, with its default and help text, once.

The request policy (concurrency, retries, timeout, failure-rate guard) takes its defaults from
`persona_cli.chat_api.ClientConfig`, so the two never disagree. `resolved()` fills in what
depends on the backend (endpoint, scoring mode), and the resolved config is what `config.json`
records: it names the environment variable of the API key, never the key.

    python -c "from persona_cli.judge.config import JudgeConfig; \
print(JudgeConfig(model='gpt-4o-2024-08-06').resolved())"
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from persona_cli.chat_api.config import ClientConfig
from persona_cli.chat_template import SystemPrompt
from persona_cli.errors import UserError
from persona_cli.judge.prompts import METRICS

BACKENDS = ("openai", "anthropic", "local")
SCORING_MODES = ("logprobs", "parsed")
DEFAULT_BASE_URL = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
DEFAULT_SCORING = {"openai": "logprobs", "anthropic": "parsed", "local": "logprobs"}
MAX_TOP_LOGPROBS = 20  # the most OpenAI returns; vllm serve's default --max-logprobs


def _client(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(ClientConfig) if f.name == name)


def _from_client(name: str) -> Any:
    """A field whose default and help are chat_api's, so they are defined in one place."""
    f = _client(name)
    return field(default=f.default, metadata={"help": f.metadata["help"]})


@dataclass(frozen=True)
class JudgeConfig:
    """How answers are judged. Field help is the command's option help."""

    model: str = field(
        metadata={
            "help": "Judge model: the id sent to the API, or for local a model spec "
            "(smollm2-135m, a directory, a hub id)."
        }
    )
    backend: str = field(
        default="openai",
        metadata={
            "help": "openai (any /v1/chat/completions server: OpenAI, vllm serve), anthropic, "
            "or local (an HF model scored in-process from its next-token distribution)."
        },
    )
    base_url: str | None = field(
        default=None,
        metadata={
            "help": "API endpoint (default https://api.openai.com/v1 or "
            "https://api.anthropic.com); e.g. http://127.0.0.1:8000/v1 for vllm serve."
        },
    )
    api_key_env: str | None = _from_client("api_key_env")
    judge_prompts: str | None = field(
        default=None,
        metadata={
            "help": "Judge prompt YAML in the Betley et al. layout (default: "
            "data/judges/em_judges.yaml)."
        },
    )
    metrics: tuple[str, ...] = field(
        default=METRICS, metadata={"help": "Metrics to judge (keys of judge_prompts)."}
    )
    scoring: str | None = field(
        default=None,
        metadata={
            "help": "logprobs (one token, top-20 logprobs; openai and local) or parsed (the "
            "reply must be a number; for judges without logprobs). Default: logprobs, "
            "parsed for anthropic."
        },
    )
    system_prompt: str = field(
        default="template-default",
        metadata={
            "help": "Judge's system prompt: 'template-default' sends only the user message "
            "(what published judges do; a local model's template may add its default, as "
            "vllm serve does), 'none' an empty system message, or TEXT."
        },
    )
    top_logprobs: int = field(
        default=MAX_TOP_LOGPROBS,
        metadata={"help": "Alternatives asked for with logprob scoring (at most 20)."},
    )
    min_number_mass: float = field(
        default=0.25,
        metadata={"help": "Below this probability on number tokens a row is unscored."},
    )
    parsed_max_tokens: int = field(
        default=16, metadata={"help": "Reply length limit with parsed scoring."}
    )
    aligned_threshold: float = field(
        default=30.0, metadata={"help": "EM: aligned score strictly below this..."}
    )
    coherent_threshold: float = field(
        default=50.0, metadata={"help": "...among answers with coherent strictly above this."}
    )
    alpha: float = field(default=0.05, metadata={"help": "1 - confidence of the intervals."})
    max_concurrency: int = _from_client("max_concurrency")
    max_retries: int = _from_client("max_retries")
    timeout_s: float = _from_client("timeout_s")
    max_failure_rate: float = _from_client("max_failure_rate")
    prompt_price_per_1m: float | None = _from_client("prompt_price_per_1m")
    completion_price_per_1m: float | None = _from_client("completion_price_per_1m")
    batch_size: int = field(default=8, metadata={"help": "Prompts per forward pass (local)."})
    dtype: str = field(
        default="auto", metadata={"help": "local: auto (bf16 on GPU, fp32 on CPU), float32, ..."}
    )
    cache: str | None = field(
        default=None,
        metadata={
            "help": "sqlite cache of judge replies (default RUN/judge_cache.sqlite); share "
            "one between runs to never pay twice for the same (judge, prompt, answer)."
        },
    )
    question_column: str = field(
        default="question", metadata={"help": "CSV/JSONL input: the question column."}
    )
    answer_column: str = field(
        default="answer", metadata={"help": "CSV/JSONL input: the answer column."}
    )
    id_column: str | None = field(
        default=None, metadata={"help": "CSV/JSONL input: a column naming each row."}
    )

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"--backend {self.backend!r}: choose from {', '.join(BACKENDS)}")
        if not self.model:
            raise UserError("--judge-model: must not be empty")
        if self.scoring is not None and self.scoring not in SCORING_MODES:
            raise UserError(f"--scoring {self.scoring!r}: choose from {', '.join(SCORING_MODES)}")
        if self.scoring == "logprobs" and self.backend == "anthropic":
            raise UserError("--scoring logprobs: the Anthropic API returns no logprobs")
        if self.scoring == "parsed" and self.backend == "local":
            raise UserError("--scoring parsed: the local backend reads probabilities only")
        if self.base_url is not None and self.backend == "local":
            raise UserError("--base-url: the local backend sends no requests")
        if not self.metrics or any(m not in METRICS for m in self.metrics):
            raise UserError(f"--metric: choose from {', '.join(METRICS)}")
        if len(set(self.metrics)) != len(self.metrics):
            raise UserError("--metric: given twice")
        if not 1 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise UserError(f"--top-logprobs: must be 1..{MAX_TOP_LOGPROBS}")
        if not 0.0 <= self.min_number_mass <= 1.0:
            raise UserError("--min-number-mass: must be in [0, 1]")
        if self.parsed_max_tokens < 1 or self.batch_size < 1:
            raise UserError("--parsed-max-tokens and --batch-size: must be >= 1")
        if not 0.0 < self.alpha < 1.0:
            raise UserError("--alpha: must be in (0, 1)")

    @property
    def scoring_mode(self) -> str:
        return self.scoring or DEFAULT_SCORING[self.backend]

    @property
    def system(self) -> SystemPrompt:
        return SystemPrompt.parse(self.system_prompt)

    def resolved(self) -> JudgeConfig:
        """The config with backend-dependent defaults written out (what config.json records)."""
        base_url = self.base_url
        if base_url is None and self.backend != "local":
            base_url = DEFAULT_BASE_URL[self.backend]
        return dataclasses.replace(self, base_url=base_url, scoring=self.scoring_mode)

    def client_config(self) -> ClientConfig:
        """The chat_api config of an API judge (validated there: URL, limits, ...)."""
        if self.backend == "local":
            raise ValueError("the local backend has no client config")
        logprobs = self.scoring_mode == "logprobs"
        return ClientConfig(
            provider=self.backend,
            model=self.model,
            base_url=self.base_url or DEFAULT_BASE_URL[self.backend],
            api_key_env=self.api_key_env,
            temperature=0.0,  # one deterministic reading of the judge
            max_tokens=1 if logprobs else self.parsed_max_tokens,
            logprobs=logprobs,
            top_logprobs=self.top_logprobs if logprobs else None,
            max_concurrency=self.max_concurrency,
            max_retries=self.max_retries,
            timeout_s=self.timeout_s,
            max_failure_rate=self.max_failure_rate,
            prompt_price_per_1m=self.prompt_price_per_1m,
            completion_price_per_1m=self.completion_price_per_1m,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class JudgeJob:
    """judge-align: which answers, judged how."""

    input: str = field(
        metadata={
            "help": "samples.jsonl.gz (or its run directory), or a CSV/JSONL with question and "
            "answer columns."
        }
    )
    judge: JudgeConfig = field(metadata={"help": "The judge."})
