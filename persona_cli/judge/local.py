"""The `local` judge backend: an HF model read in-process, no server.

The judge prompt is rendered through `persona_cli.chat_template` with the same system-prompt
choice an API judge gets (`remote.judge_messages`), so a `vllm serve` of the same weights sees
the same text. Instead of the top-20 logprobs an API returns, the whole next-token distribution
after the assistant header is read (softmax over the full vocabulary, fp32): every vocabulary
token whose stripped text is an integer 0..100 contributes, and `scoring.score_logprobs` applies
the same aggregation and the same 0.25 mass rule. The top-20 tokens are kept for the row too.

Results are `ChatResult`s (provider "local") stored in the chat_api sqlite cache under a key of
(model fingerprint, dtype, rendered prompt), so an interrupted local run resumes as an API run
does.

Tokenizers that split digits (SmolLM2, Qwen2.5, Llama 2) have number tokens only for 0..9: the
score is then the expected FIRST DIGIT of the judge's answer, not a 0-100 score. The run logs a
warning and records the covered values (`number_vocab` in the manifest).

    persona-cli judge-align --backend local --judge-model smollm2-135m --input RUN --out JUDGE
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from persona_cli import models
from persona_cli.artifacts import sha256_json
from persona_cli.chat_api import ChatResult, ResultCache
from persona_cli.chat_template import guard_record, inspect_template, render
from persona_cli.errors import UserError
from persona_cli.judge.config import JudgeConfig
from persona_cli.judge.scoring import number_value

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
PROVIDER = "local"


class LocalJudge:
    """A loaded judge model with its table of number tokens."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.resolved = models.ensure_prepared(config.model)
        self.tokenizer = models.load_tokenizer(self.resolved)
        self.report = inspect_template(self.tokenizer)
        self.net = models.load_model(self.resolved, dtype=config.dtype)
        self.net.eval()
        self.number_ids, self.number_tokens = self._number_table()
        values = sorted({number_value(t) for t in self.number_tokens})
        self.number_values = [v for v in values if v is not None]
        if not self.number_ids:
            raise UserError(
                f"--judge-model {config.model}: its vocabulary has no token for a number 0..100"
            )
        if max(self.number_values) < 10:
            log.warning(
                "%s: the tokenizer splits digits (number tokens only for %s): a logprob score "
                "is the expected first digit of the judge's answer, not a 0-100 score",
                config.model,
                ", ".join(map(str, self.number_values)),
            )

    def _number_table(self) -> tuple[list[int], list[str]]:
        ids, tokens = [], []
        for i in range(len(self.tokenizer)):
            text = self.tokenizer.decode([i])
            if number_value(text) is not None:
                ids.append(i)
                tokens.append(text)
        return ids, tokens

    def render(self, prompt: str) -> str:
        return render(
            self.tokenizer,
            [{"role": "user", "content": prompt}],
            self.config.system,
            self.report,
            add_generation_prompt=True,
        )

    def chat_template_record(self) -> dict[str, Any]:
        return guard_record(self.tokenizer, self.config.system)

    def model_record(self) -> dict[str, Any]:
        return models.model_record(self.resolved, self.net)

    def cache_key(self, text: str) -> str:
        return sha256_json(
            {
                "provider": PROVIDER,
                "model": self.resolved.spec,
                "revision": self.resolved.revision,
                "dtype": str(self.net.dtype),
                "top_logprobs": self.config.top_logprobs,
                "prompt": text,
            }
        )

    def _forward(self, texts: list[str]) -> list[dict[str, Any]]:
        import torch

        tok = self.tokenizer
        # The chat template already wrote the special tokens; vllm serve does not add more.
        enc = tok(
            texts,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        )
        mask = enc["attention_mask"]
        # Left padding must not shift the positions of the real tokens.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = self.net.device
        with torch.inference_mode():
            logits = self.net(
                input_ids=enc["input_ids"].to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
            ).logits[:, -1, :]
        logprobs = logits.float().log_softmax(-1).cpu()
        top = logprobs.topk(self.config.top_logprobs, dim=-1)
        numbers = logprobs[:, self.number_ids]
        out = []
        for b in range(len(texts)):
            out.append(
                {
                    "top": [
                        {"token": tok.decode([int(i)]), "logprob": float(lp)}
                        for lp, i in zip(top.values[b], top.indices[b], strict=True)
                    ],
                    "numbers": [
                        {"token": t, "logprob": float(lp)}
                        for t, lp in zip(self.number_tokens, numbers[b], strict=True)
                    ],
                    "prompt_tokens": int(mask[b].sum()),
                    "argmax": tok.decode([int(top.indices[b, 0])]),
                }
            )
        return out

    def results(
        self,
        prompts: Sequence[tuple[str, str]],
        cache_path: Path,
        progress: Progress | None = None,
    ) -> list[ChatResult]:
        """One ok `ChatResult` per `(request_id, judge prompt)`, in order, cached."""
        rendered = [(rid, self.render(p)) for rid, p in prompts]
        by_key: dict[str, list[int]] = {}
        texts: dict[str, str] = {}
        for i, (_, text) in enumerate(rendered):
            key = self.cache_key(text)
            by_key.setdefault(key, []).append(i)
            texts[key] = text
        results: list[ChatResult | None] = [None] * len(rendered)
        done = 0

        def place(result: ChatResult, key: str, cached: bool) -> None:
            nonlocal done
            for i in by_key[key]:
                results[i] = replace(result, id=rendered[i][0], from_cache=cached)
                done += 1

        with ResultCache(cache_path) as cache:
            todo = []
            for key in by_key:
                hit = cache.get(key)
                if hit is None:
                    todo.append(key)
                else:
                    place(hit, key, True)
            if progress is not None:
                progress(done, len(rendered))
            log.info("local judge: %d of %d prompts cached", done, len(rendered))
            # Similar lengths per batch: less padding, fewer wasted FLOPs.
            todo.sort(key=lambda k: len(texts[k]))
            for start in range(0, len(todo), self.config.batch_size):
                keys = todo[start : start + self.config.batch_size]
                t0 = time.monotonic()
                outs = self._forward([texts[k] for k in keys])
                latency = (time.monotonic() - t0) / len(keys)
                for key, o in zip(keys, outs, strict=True):
                    result = ChatResult(
                        key=key,
                        id=rendered[by_key[key][0]][0],
                        provider=PROVIDER,
                        model=self.config.model,
                        status="ok",
                        attempts=1,
                        content=o["argmax"],
                        top_logprobs=[o["top"]],
                        prompt_tokens=o["prompt_tokens"],
                        completion_tokens=0,
                        latency_s=latency,
                        response_model=self.resolved.path,
                        raw={"number_logprobs": o["numbers"]},
                    )
                    cache.put(result, {"prompt": texts[key]})
                    place(result, key, False)
                if progress is not None:
                    progress(done, len(rendered))
        final = [r for r in results if r is not None]
        assert len(final) == len(rendered)
        return final
