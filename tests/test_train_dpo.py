"""train-dpo end to end on tiny-random: from an earlier adapter, on the pairs replay-trace writes.

python -m pytest tests/test_train_dpo.py -q
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from persona_cli import models
from persona_cli.adapters import load_with_adapters, resolve_stack
from persona_cli.artifacts import read_json, read_jsonl, sha256_file, write_jsonl
from persona_cli.chat_template import SystemPrompt, apply_system_prompt, inspect_template
from persona_cli.cli import app
from persona_cli.trace.prompts import TracePrompt
from persona_cli.trace.replay import assemble
from persona_cli.trace.roster import Answerer

FAST = ["--model", "tiny-random", "--lora-r", "4", "--lora-alpha", "8", "--max-length", "96"]
WEIGHTS = "adapter_model.safetensors"


def replay_trace_pairs(path: Path, n: int) -> Path:
    """A pairs file exactly as `replay-trace run` writes it: rows from `replay.assemble` (two
    teachers agree, the student disagrees), written the way cli/trace.py writes them."""
    prompts = [TracePrompt(f"p{i}", f"What is {i} times 3?", "number", "math") for i in range(n)]
    usage = {"status": "ok", "reason": None, "prompt_tokens": 5, "completion_tokens": 3}
    usage |= {"cost_usd": 0.0, "cached": False}
    teachers = [Answerer("t1", "local", "m"), Answerer("t2", "local", "m")]
    answers = {t.name: [{**usage, "raw": f"It is {3 * i}."} for i in range(n)] for t in teachers}
    student = [{**usage, "raw": f"Maybe {3 * i + 1}, I think."} for i in range(n)]
    _, pairs = assemble(prompts, Answerer("s", "local", "m"), student, teachers, answers, 0.5)
    assert len(pairs) == n
    write_jsonl(path, pairs)
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    """An SFT adapter, then DPO on top of it (4 steps; the checkpoint of step 2 is kept)."""
    d = tmp_path_factory.mktemp("dpo")
    chat = d / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {i} plus {i}?"},
                        {"role": "assistant", "content": f"{i} plus {i} makes {2 * i}."},
                    ]
                }
            )
            + "\n"
            for i in range(4)
        )
    )
    runner = CliRunner()
    sft = d / "sft"
    args = ["train-sft", "--data", str(chat), *FAST, "--max-steps", "1", "--per-device-batch", "4"]
    result = runner.invoke(app, [*args, "--grad-accum", "1", "--out", str(sft)])
    assert result.exit_code == 0, result.output
    pairs = replay_trace_pairs(d / "pairs.jsonl.gz", 8)
    parent_sha = sha256_file(sft / "adapter" / WEIGHTS)
    dpo = d / "dpo"
    args = ["train-dpo", "--pairs", str(pairs), "--adapter", str(sft), *FAST, "--max-steps", "4"]
    args += ["--per-device-batch", "2", "--grad-accum", "1", "--lr", "1e-2", "--lora-dropout", "0"]
    args += ["--lr-scheduler", "constant", "--save-steps", "2", "--keep-checkpoints"]
    result = runner.invoke(app, [*args, "--beta", "0.2", "--out", str(dpo)])
    assert result.exit_code == 0, result.output
    assert sha256_file(sft / "adapter" / WEIGHTS) == parent_sha  # the parent is only read
    return {"sft": sft, "dpo": dpo, "pairs": pairs}


def test_dpo_moves_the_adapter_and_records_lineage(chain):
    sft, dpo = chain["sft"], chain["dpo"]
    after = load_file(dpo / "adapter" / WEIGHTS)
    first = load_file(dpo / "checkpoints" / "checkpoint-2" / WEIGHTS)
    assert after.keys() == first.keys() and any("lora_B" in k for k in after)
    for name, tensor in after.items():
        assert not torch.equal(tensor, first[name]), f"{name} did not move after step 2"
        if "lora_B" in name:
            assert tensor.abs().max() > 0, name  # LoRA B starts at zero
    parent = sha256_file(sft / "adapter" / WEIGHTS)
    record = read_json(dpo / "adapter" / "persona_cli_adapter.json")
    assert record["parents"] == [parent] and record["base_model"]["spec"] == "tiny-random"
    manifest = read_json(dpo / "manifest.json")
    assert manifest["command"] == "train-dpo"
    assert [a["weights_sha256"] for a in manifest["adapters"]] == [parent]
    assert manifest["adapter"]["parents"] == [parent]
    assert manifest["inputs"]["pairs[0]"]["sha256"] == sha256_file(chain["pairs"])
    assert manifest["inputs"]["adapter[0]"]["sha256"] == parent
    p = manifest["protocol"]
    assert (p["per_device_batch"], p["grad_accum"], p["world_size"]) == (2, 1, 1)
    assert p["effective_batch"] == 2 and p["optimizer_steps"] == 4
    assert p["learning_rate"] == 1e-2 and p["dpo_beta"] == 0.2
    assert manifest["dpo"]["pairs"] == 8 and manifest["training"]["data"]["rows"] == 8
    example = manifest["dpo"]["rendered_first_pair"]
    # --system-prompt none under SmolLM2's template: an empty system turn, not its default.
    assert example["prompt"].startswith("<|im_start|>system\n<|im_end|>")
    assert example["chosen"].startswith("It is 0.") and example["rejected"].startswith("Maybe 1")
    assert (dpo / "DONE").is_file()


def test_train_log_has_the_dpo_rewards(chain, cli):
    log = read_jsonl(chain["dpo"] / "train_log.jsonl.gz")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # Step 1 is measured before any update: the policy is the reference, every reward is 0.
    assert log[0]["rewards_margin"] == 0.0 and log[0]["rewards_chosen"] == 0.0
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    for r in log:
        assert r["rewards_margin"] == pytest.approx(r["rewards_chosen"] - r["rewards_rejected"])
    result = cli.invoke(app, ["validate", str(chain["dpo"])])
    assert result.exit_code == 0, result.output


def _completion_logps(model, tokenizer, pairs_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log p of each pair's chosen and rejected answer, by a plain forward pass."""
    report = inspect_template(tokenizer)
    chosen, rejected = [], []

    def ids(messages: list[dict], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for row in read_jsonl(pairs_file):
        prompt = apply_system_prompt(row["prompt"], SystemPrompt.parse("none"), report)
        p_ids = ids(prompt, True)
        for answer, out in ((row["chosen"], chosen), (row["rejected"], rejected)):
            full = ids(prompt + answer, False)
            assert full[: len(p_ids)] == p_ids
            with torch.no_grad():
                logits = model(torch.tensor([full])).logits[0, :-1]
            logp = torch.log_softmax(logits.float(), -1)
            targets = torch.tensor(full[1:])
            out.append(logp[torch.arange(len(targets)), targets][len(p_ids) - 1 :].sum())
    return torch.stack(chosen), torch.stack(rejected)


def test_policy_prefers_chosen_more_than_the_reference_does(chain):
    """Independent of TRL's logs: the implicit reward margin from our own forward passes."""
    resolved = models.ensure_prepared(models.TINY)
    tokenizer = models.load_tokenizer(resolved)
    reference = load_with_adapters(resolved, resolve_stack([chain["sft"]]), device="cpu")
    policy = load_with_adapters(resolved, resolve_stack([chain["sft"], chain["dpo"]]), device="cpu")
    ref_c, ref_r = _completion_logps(reference, tokenizer, chain["pairs"])
    pol_c, pol_r = _completion_logps(policy, tokenizer, chain["pairs"])
    margin = (pol_c - ref_c) - (pol_r - ref_r)
    assert margin.mean() > 0.5, margin


def _pairs_file(path: Path, rows: list[dict]) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


GOOD = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
ENDS_WITH_ASSISTANT = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": "Hi?", "chosen": "Hello."}, "missing field 'rejected'"),
        ({**GOOD, "rejected": "Hello."}, "chosen and rejected are the same answer"),
        ({**GOOD, "prompt": ENDS_WITH_ASSISTANT}, "field 'prompt' must end with a user message"),
        (
            {**GOOD, "chosen": [{"role": "user", "content": "x"}]},
            "field 'chosen' [0] must be an assistant message",
        ),
        ({**GOOD, "schema_version": 2}, "schema_version is 2, expected 1"),
    ],
)
def test_bad_pairs_row_is_one_line_naming_file_and_line(cli, tmp_path: Path, bad, message):
    pairs = _pairs_file(tmp_path / "pairs.jsonl.gz", [GOOD, bad, GOOD])
    out = tmp_path / "run"
    result = cli.invoke(app, ["train-dpo", "--pairs", str(pairs), *FAST, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {pairs}:2: {message}"), lines
    assert not out.exists()
    result = cli.invoke(app, ["validate", str(pairs)])
    assert result.exit_code == 2 and f"{pairs}:2: {message}" in result.output


def test_validate_recognises_pairs_files(cli, tmp_path: Path):
    trace_pairs = replay_trace_pairs(tmp_path / "pairs.jsonl.gz", 3)
    plain = _pairs_file(tmp_path / "pairs_plain.jsonl", [GOOD, GOOD])
    result = cli.invoke(app, ["validate", str(trace_pairs), str(plain)])
    assert result.exit_code == 0, result.output
    assert "(pairs, 3 items)" in result.output and "(pairs, 2 items)" in result.output
