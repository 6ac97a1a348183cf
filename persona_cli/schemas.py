"""The schema of each artifact kind, documented once, checked by every reader and by `validate`.

A `RowSchema` lists the fields of one row kind with their types; `check(row)` returns the
problems as short strings (empty list when valid). Readers pass `schema.check` to
`artifacts.iter_jsonl`, so a command reading a file and `persona-cli validate` report the same
`FILE:LINE: problem`. Bump a kind's `version` when its fields change and say so in `doc`.

Kinds:
- `chat`: user-supplied SFT data, `{"messages": [{"role", "content"}, ...]}` (extra keys kept).
- `samples`: one generated completion per row (`samples.jsonl.gz`).
- `step`: one per-sample record of a replayable training or probe step (`step_NNNNNN.jsonl.gz`);
  reward-hack probe rows name their `stage` and follow `POOL_STEP` (teacher pool: prompt,
  completion, sandbox labels, token counts) or `PROBE_STEP` (replay: cosines with v_hack).
- `judgments`: one judge reading of one answer for one metric (`judgments.jsonl.gz`).
- `train_log`: one optimizer step of a training run (`train_log.jsonl.gz`).
- `pairs`: one DPO preference pair, `{prompt, chosen, rejected, provenance?}` (`pairs.jsonl.gz`
  of replay-trace; the input of train-dpo).
- `manifest`, `config`, `summary`: the JSON documents of a run directory.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CHAT_ROLES = ("system", "user", "assistant")

Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Field:
    name: str
    types: tuple[type, ...]
    required: bool = True
    nullable: bool = False
    check: Check | None = None
    doc: str = ""


@dataclass(frozen=True)
class RowSchema:
    kind: str
    version: int | None  # None: user-supplied input that carries no schema_version
    fields: tuple[Field, ...]
    extra_allowed: bool = False
    doc: str = ""
    row_check: Callable[[dict[str, Any]], list[str]] | None = field(default=None)

    def check(self, row: dict[str, Any]) -> list[str]:
        problems: list[str] = []
        if self.version is not None:
            got = row.get("schema_version")
            if got != self.version:
                problems.append(
                    f"schema_version is {got!r}, expected {self.version} for a {self.kind} row"
                )
        known = {"schema_version"}
        for f in self.fields:
            known.add(f.name)
            if f.name not in row:
                if f.required:
                    problems.append(f"missing field '{f.name}'")
                continue
            value = row[f.name]
            if value is None:
                if not f.nullable:
                    problems.append(f"field '{f.name}' is null")
                continue
            # bool is an int subclass; a count field must not accept True.
            if not isinstance(value, f.types) or (isinstance(value, bool) and bool not in f.types):
                names = " or ".join(t.__name__ for t in f.types)
                problems.append(f"field '{f.name}' must be {names}, got {type(value).__name__}")
                continue
            if f.check is not None and (msg := f.check(value)):
                problems.append(f"field '{f.name}' {msg}")
        if not self.extra_allowed:
            extra = sorted(set(row) - known)
            if extra:
                problems.append(f"unknown field(s) {', '.join(map(repr, extra))}")
        if not problems and self.row_check is not None:
            problems.extend(self.row_check(row))
        return problems


def _non_negative(v: Any) -> str | None:
    return "must be >= 0" if v < 0 else None


def _non_empty(v: Any) -> str | None:
    return "must not be empty" if len(v) == 0 else None


def check_messages(messages: Any) -> str | None:
    """Problems with a chat `messages` list, as one string naming the offending entry."""
    if not isinstance(messages, list):
        return f"must be a list of messages, got {type(messages).__name__}"
    if not messages:
        return "must not be empty"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"[{i}] must be an object with 'role' and 'content'"
        role = m.get("role")
        if role not in CHAT_ROLES:
            return f"[{i}].role {role!r} is not one of {', '.join(CHAT_ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"[{i}].content must be a string"
        if role == "system" and i != 0:
            return f"[{i}] a system message may only come first"
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles or roles[0] != "user":
        return "the first non-system message must be from the user"
    for a, b in itertools.pairwise(roles):
        if a == b:
            return "user and assistant messages must alternate"
    return None


CHAT = RowSchema(
    kind="chat",
    version=None,
    fields=(
        Field(
            "messages",
            (list,),
            check=check_messages,
            doc="system? then alternating user/assistant turns",
        ),
    ),
    extra_allowed=True,
    doc="SFT conversation. Training takes loss on assistant turns; the last turn should be "
    "the assistant's.",
)

SAMPLES = RowSchema(
    kind="samples",
    version=1,
    fields=(
        Field("persona", (str,), doc="persona id whose system prompt was used"),
        Field("question_id", (str,)),
        Field("question", (str,), doc="the exact user text sent"),
        Field("sample_index", (int,), check=_non_negative),
        Field("text", (str,), doc="the raw completion, untrimmed"),
        Field("n_tokens", (int,), check=_non_negative),
        Field("finish_reason", (str,), nullable=True, doc="'stop', 'length', or null"),
        Field("backend", (str,), doc="'hf' or 'vllm'"),
        Field("seed", (int,)),
        Field(
            "adapter",
            (str,),
            required=False,
            nullable=True,
            doc="sha256 of each adapter's weights, '+'-joined in stack order; null: base model",
        ),
    ),
    doc="One completion per row; summaries are recomputed from these.",
)


def _unit_interval(v: Any) -> str | None:
    return "must be in [-1, 1]" if not -1.0 - 1e-6 <= v <= 1.0 + 1e-6 else None


def _probe_module_map(v: Any) -> str | None:
    # {module name: cosine or null} or {module name: bool}: one entry per adapter module.
    if not all(isinstance(k, str) for k in v):
        return "must map module names to values"
    if not all(x is None or isinstance(x, (bool, int, float)) for x in v.values()):
        return "values must be numbers, booleans or null"
    return None


# Reward-hack probe (experiment 4), stage "pool": one teacher completion, labelled by the
# sandbox (persona_cli.sandbox.Result.to_row gives hacked, gt_pass and reward).
POOL_STEP = RowSchema(
    kind="step",
    version=1,
    fields=(
        Field("step", (int,), check=_non_negative, doc="pool step (one teacher batch)"),
        Field("sample_index", (int,), check=_non_negative, doc="row index within the step"),
        Field("stage", (str,), doc="'pool'"),
        Field("problem_id", (str,), doc="id in the problem file; GRPO groups rows by it"),
        Field("prompt", (str,), doc="the rendered prompt string (chat template applied)"),
        Field("completion", (str,), doc="the raw completion text"),
        Field("hacked", (bool,), doc="tampered with the grader and the grader passed"),
        Field("gt_pass", (bool,), doc="hidden ground-truth tests pass"),
        Field("reward", (float, int), doc="grader reward (1.0 when the grader passed)"),
        Field("n_prompt_tokens", (int,), check=_non_negative),
        Field("n_completion_tokens", (int,), check=_non_negative),
        Field(
            "old_logprobs",
            (list,),
            required=False,
            nullable=True,
            doc="log p of each completion token under the sampling policy (importance ratios)",
        ),
    ),
    extra_allowed=True,  # sandbox categories, tamper reasons, teacher id, ... are kept
    doc="A teacher-pool row (probe teacher-pool), in step_NNNNNN.jsonl.gz.",
)

# Stage "replay": one pool row's gradient against v_hack (probe replay). cos_in, cos_out and
# fired map each adapter module to its value; cosines are null where undefined (zero norm),
# and `reason` says why a row has no cosine or did not enter the update.
PROBE_STEP = RowSchema(
    kind="step",
    version=1,
    fields=(
        Field("step", (int,), check=_non_negative),
        Field("sample_index", (int,), check=_non_negative),
        Field("stage", (str,), doc="'replay'"),
        Field("problem_id", (str,)),
        Field("hacked", (bool,)),
        Field("gt_pass", (bool,)),
        Field("reward", (float, int)),
        Field("advantage", (float, int), doc="weight of the sample's gradient in the update"),
        Field("nll", (float, int), nullable=True, doc="mean completion NLL before the update"),
        Field("cos", (float, int), nullable=True, check=_unit_interval, doc="plain cosine"),
        Field("cos_weighted", (float, int), nullable=True, check=_unit_interval),
        Field("cos_in", (dict,), check=_probe_module_map, doc="per module, before projection"),
        Field("cos_out", (dict,), check=_probe_module_map, doc="per module, after projection"),
        Field("fired", (dict,), check=_probe_module_map, doc="per module, projection applied"),
        Field("frac_fired", (float, int), nullable=True, doc="fired / modules with a cosine"),
        Field("in_update", (bool,), doc="the sample's gradient entered the optimizer step"),
        Field("reason", (str,), nullable=True, doc="null, or why cos is null / not in update"),
    ),
    extra_allowed=True,
    doc="A probe replay row (probe replay), in step_NNNNNN.jsonl.gz.",
)

STEP_STAGES: dict[str, RowSchema] = {"pool": POOL_STEP, "replay": PROBE_STEP}


def _check_step_stage(row: dict[str, Any]) -> list[str]:
    # A row that names its stage is checked against that stage's fields; rows of other
    # replayable stages (no `stage`) keep the generic step/sample_index contract.
    stage = row.get("stage")
    if stage is None:
        return []
    if stage not in STEP_STAGES:
        return [f"field 'stage' {stage!r} is not one of {', '.join(STEP_STAGES)}"]
    return STEP_STAGES[stage].check(row)


STEP = RowSchema(
    kind="step",
    version=1,
    fields=(
        Field("step", (int,), check=_non_negative),
        Field("sample_index", (int,), check=_non_negative),
    ),
    extra_allowed=True,  # each probe stage adds its own per-sample fields
    doc="One per-sample record of a replayable step, in step_NNNNNN.jsonl.gz. A row with "
    "`stage` ('pool' or 'replay') is also checked against POOL_STEP or PROBE_STEP.",
    row_check=_check_step_stage,
)

# User-supplied input of extract-vhack: one hack and one clean completion of the same prompt.
VHACK_PAIRS = RowSchema(
    kind="vhack_pairs",
    version=None,
    fields=(
        Field("prompt", (str,), doc="the rendered prompt string"),
        Field("hack", (str,), doc="a completion that hacks the grader"),
        Field("clean", (str,), doc="an honest completion"),
        Field("problem_id", (str,), required=False, nullable=True),
    ),
    extra_allowed=True,
    doc="extract-vhack --pairs FILE: hack/clean completion pairs.",
)


def _dpo_field(name: str, doc: str) -> Field:
    return Field(name, (float, int), required=False, doc=f"train-dpo only: {doc}")


TRAIN_LOG = RowSchema(
    kind="train_log",
    version=1,
    fields=(
        Field("step", (int,), check=_non_negative, doc="optimizer step, from 1"),
        Field("loss", (float, int)),
        Field("lr", (float, int), doc="learning rate at this step"),
        Field("grad_norm", (float, int), nullable=True, doc="before clipping"),
        Field("tokens", (int,), check=_non_negative, doc="input tokens in this step"),
        Field("tokens_total", (int,), check=_non_negative),
        Field("epoch", (float, int)),
        _dpo_field("rewards_chosen", "mean beta * (log p - log p_ref) of the chosen answers"),
        _dpo_field("rewards_rejected", "the same for the rejected answers"),
        _dpo_field("rewards_margin", "mean rewards_chosen - rewards_rejected per pair"),
        _dpo_field("rewards_accuracy", "share of pairs whose chosen reward is the higher"),
        _dpo_field("logps_chosen", "mean summed log p of the chosen answers"),
        _dpo_field("logps_rejected", "mean summed log p of the rejected answers"),
        *(
            Field(
                name, (float, int), required=False, nullable=True, doc=f"train-grpo --vhack: {doc}"
            )
            for name, doc in (
                ("proj_cos_in", "mean over modules of cos(update_m, v_hack_m) before projection"),
                ("proj_cos_out", "the same after the projection"),
                ("proj_frac_fired", "modules projected / modules with a cosine"),
                ("proj_max_cos_out_fired", "largest cos_out over projected modules"),
            )
        ),
    ),
    doc="One optimizer step of a LoRA training run (train_log.jsonl.gz); train-dpo rows add "
    "the DPO rewards, measured on the step's batch before its update.",
)

PAIRS_VERSION = 1


def _check_prompt(v: Any) -> str | None:
    if isinstance(v, str):
        return "must not be empty" if not v.strip() else None
    if (msg := check_messages(v)) is not None:
        return msg
    return None if v[-1]["role"] == "user" else "must end with a user message"


def _check_completion(v: Any) -> str | None:
    if isinstance(v, str):
        return "must not be empty" if not v.strip() else None
    if not v:
        return "must not be empty"
    for i, m in enumerate(v):
        if not isinstance(m, dict) or m.get("role") != "assistant":
            return f"[{i}] must be an assistant message ({{'role': 'assistant', 'content'}})"
        if not isinstance(m.get("content"), str):
            return f"[{i}].content must be a string"
    return None


def _pairs_check(row: dict[str, Any]) -> list[str]:
    problems = []
    if "schema_version" in row and row["schema_version"] != PAIRS_VERSION:
        problems.append(f"schema_version is {row['schema_version']!r}, expected {PAIRS_VERSION}")
    if row["chosen"] == row["rejected"]:
        problems.append("chosen and rejected are the same answer (the pair teaches nothing)")
    return problems


PAIRS = RowSchema(
    kind="pairs",
    version=None,  # written by replay-trace (schema_version 1) or brought by the user (none)
    fields=(
        Field(
            "prompt",
            (str, list),
            check=_check_prompt,
            doc="the user text, or chat messages (system? user/assistant turns) ending with "
            "the user's",
        ),
        Field(
            "chosen",
            (str, list),
            check=_check_completion,
            doc="the preferred answer: text, or [{'role': 'assistant', 'content'}]",
        ),
        Field("rejected", (str, list), check=_check_completion, doc="the dispreferred answer"),
        Field(
            "provenance",
            (dict,),
            required=False,
            nullable=True,
            doc="replay-trace: teachers that agreed, their raw answers, usage and cost",
        ),
    ),
    extra_allowed=True,
    row_check=_pairs_check,
    doc="A DPO preference pair (pairs.jsonl.gz of replay-trace run; train-dpo --pairs). TRL's "
    "preference layout, standard or conversational.",
)


def _score_range(v: Any) -> str | None:
    return "must be in [0, 100]" if not 0 <= v <= 100 else None


def _judgment_check(row: dict[str, Any]) -> list[str]:
    # A row is scored or unscored with a reason, never both and never neither (an unscored
    # row must not read as a 0).
    if (row["score"] is None) == (row["unscored_reason"] is None):
        return ["exactly one of 'score' and 'unscored_reason' must be set"]
    return []


JUDGMENTS = RowSchema(
    kind="judgments",
    version=1,
    fields=(
        Field("row_index", (int,), check=_non_negative, doc="input line / CSV record, from 1"),
        Field("sample_key", (str,), doc="persona/question_id/sample_index, or the input's id"),
        Field("persona", (str,), nullable=True),
        Field("question_id", (str,), nullable=True),
        Field("sample_index", (int,), nullable=True),
        Field("question", (str,)),
        Field("answer", (str,)),
        Field("metric", (str,), doc="'aligned' or 'coherent'"),
        Field("judge_backend", (str,), doc="'openai', 'anthropic' or 'local'"),
        Field("judge_model", (str,), doc="the model asked for"),
        Field("response_model", (str,), nullable=True, doc="what the server says it ran"),
        Field("prompt_sha256", (str,), doc="sha256 of this metric's judge prompt template"),
        Field("scoring", (str,), doc="'logprobs' or 'parsed'"),
        Field("score", (float, int), nullable=True, check=_score_range, doc="null if unscored"),
        Field(
            "unscored_reason",
            (str,),
            nullable=True,
            doc="low_number_mass, request_failed, unparsable_reply, escape_word, ...",
        ),
        Field("detail", (str,), nullable=True, doc="e.g. the request's failure reason"),
        Field("number_mass", (float, int), nullable=True, doc="probability on number tokens"),
        Field("reply", (str,), nullable=True, doc="the judge's raw reply text"),
        Field("top_logprobs", (list,), nullable=True, doc="[{token, logprob}] of the reply"),
        Field(
            "number_logprobs",
            (list,),
            nullable=True,
            doc="local backend: every number token's logprob (what the score used)",
        ),
        Field("attempts", (int,), check=_non_negative),
        Field("from_cache", (bool,)),
        Field("prompt_tokens", (int,), nullable=True),
        Field("completion_tokens", (int,), nullable=True),
    ),
    row_check=_judgment_check,
    doc="One judge reading (judgments.jsonl.gz of judge-align); summary.json derives from these.",
)

ROW_SCHEMAS: dict[str, RowSchema] = {
    s.kind: s for s in (CHAT, SAMPLES, STEP, TRAIN_LOG, JUDGMENTS, PAIRS)
}

# Run-directory file names (`persona_cli.rundir` writes them).
CONFIG = "config.json"
MANIFEST = "manifest.json"
DONE = "DONE"

# 2: `protocol` holds only guarded fields (`persona_cli.protocol.GUARDED_FIELDS`) at its top
# level and everything else under `protocol.details`; 1 mixed them and nested the sampling
# settings under `protocol.generation`. `persona_cli.protocol.recorded_fields` reads both.
MANIFEST_VERSION = 2
MANIFEST_VERSIONS_READ = (1, 2)
CONFIG_VERSION = 1

# Keys a manifest must carry; `persona_cli.manifest` is the one writer.
MANIFEST_KEYS: tuple[str, ...] = (
    "schema_version",
    "run_id",
    "command",
    "argv",
    "config_sha256",
    "inputs",
    "outputs",
    "model",
    "chat_template",
    "git",
    "packages",
    "python",
    "platform",
    "device",
    "protocol",
    "seeds",
    "timing",
)
CONFIG_KEYS: tuple[str, ...] = ("schema_version", "command", "config")

# stats / compare / report (persona_cli.compare_runs).
STATS_RESULT = "stats.json"
STATS_VERSION = 1
COMPARE_RESULT = "compare.json"
REPORT_FILE = "report.md"

# ----------------------------------------------------------------------------- JSON documents
# Every other artifact kind's file name and schema version, in one place: a writer stamps
# `schema_version` with its kind's `version` (bump it here when the kind's fields change and say
# how in `doc`). Summaries carry it like rows do.


@dataclass(frozen=True)
class Artifact:
    name: str  # file name in a run directory ("-": a record inside other files)
    version: int
    doc: str


TRAIN_SUMMARY = Artifact(
    "train_summary.json", 1, "training runs: steps, batch protocol, data, OOM retry"
)
ADAPTER_RECORD = Artifact(
    "persona_cli_adapter.json", 1, "an adapter's base model, parents, checkpoint step"
)
MODEL_RECORD = Artifact("persona_cli_model.json", 1, "a prepared model's source and revision")
MERGED_RECORD = Artifact(
    "merged.json", 1, "a merged model or a concatenated LoRA of an adapter stack"
)
EVAL_SUMMARY = Artifact(
    "summary.json",
    1,
    "eval-markers: rate and Wilson interval per persona, source, bystanders, negatives",
)
JUDGE_SUMMARY = Artifact(
    "summary.json",
    1,
    "judge-align: metric means with intervals, EM rate, unscored by reason, usage",
)
CAPABILITY_ROWS = Artifact(
    "capability.jsonl.gz",
    1,
    "eval-capability: one row per item (letter log-probs, prediction, subject, gold index)",
)
CAPABILITY_SUMMARY = Artifact(
    "summary.json",
    2,
    "eval-capability: accuracy per subject and gold class (2: per_subject, per_class, macro)",
)
COMPARE_RESULT_KIND = Artifact(
    "compare.json",
    2,
    "compare: Welch per condition vs reference, pooled count tests labelled, Holm/Bonferroni",
)
COMPARE_ITEMS = Artifact(
    "compare_items.json",
    2,
    "compare-items; 2: any run kind, rate_a/rate_b, both/a_only/b_only/neither, n_undefined",
)
DOSE_SUMMARY = Artifact(
    "summary.json",
    2,
    "dose-sweep: per arm and dose rates, seed-level headline tests, pooled tests, Holm/Bonferroni",
)
PROPORTIONS = Artifact(
    "proportions.json",
    1,
    "proportions: one labelled two-proportion test per row, adjusted p-values",
)
TRACE = Artifact("trace.jsonl.gz", 1, "replay-trace: trace rows, summary and trace_stats.json")
VHACK_SUMMARY = Artifact("summary.json", 1, "extract-vhack: counts, norm, adapter")
REPLAY_SUMMARY = Artifact("summary.json", 1, "probe replay: per-step cosine statistics")
UAT_REPORT = Artifact("uat.json", 1, "probe-uat: checks T1-T4 with figures and thresholds")
VHACK_TENSORS = Artifact(
    "v_hack.safetensors", 1, "extract-vhack: per-module direction tensors and their metadata"
)
POOL_SUMMARY = Artifact("summary.json", 1, "probe teacher-pool: per-step hack and gt_pass counts")
LEAKAGE = Artifact(
    "leakage.json", 1, "persona-vectors leakage: cosine to the source vs marker rate, correlations"
)
PROJECTIONS = Artifact(
    "projections.jsonl.gz", 1, "persona-vectors project: one projection per completion and layer"
)
PROJECT_SUMMARY = Artifact(
    "summary.json", 1, "persona-vectors project: mean projection per persona and layer"
)
CENTROID_ROWS = Artifact(
    "rows.jsonl.gz",
    1,
    "persona-vectors extract: per persona, question and method token counts and norms",
)
EXTRACT_SUMMARY = Artifact("summary.json", 1, "persona-vectors extract: methods, layers, counts")
SHIFT = Artifact("shift.json", 1, "persona-vectors shift: per-persona shift, change in mean cosine")
VECTORS = Artifact(
    "centroids.safetensors", 1, "persona vectors and trait vectors with their metadata"
)
JUDGED_PAIRS = Artifact(
    "pairs.jsonl.gz",
    1,
    "persona-vectors trait --filter-by: every judged pair and whether it was kept",
)
SIMILARITY = Artifact(
    "similarity.json", 1, "persona-vectors similarity: cosine matrices and bootstrap intervals"
)
PROBLEMS = Artifact("problems.yaml", 1, "coding problems of the reward-hack probe (an input file)")
PILOT_SCORES = Artifact(
    "hard_negatives.json", 1, "couple-marker --hard-negatives: pilot scores and the chosen personas"
)
COUPLING_SET = Artifact(
    "train_set.jsonl.gz",
    1,
    ("couple-marker: the contrastive rows it trained on"),
)
MIXTURE_ROWS = Artifact(
    "mixture.jsonl.gz", 1, "train-sft --mix: the built mixture in training order"
)
SANDBOX_RESULT = Artifact("-", 1, "one sandboxed run's result record")
CHAT_RESULT = Artifact("-", 1, "one chat API result record (judge replies, teacher answers)")
