"""Steering and ablation at generation (`eval-markers --steer / --ablate`, hf backend), driven
through the real commands.

tiny-random: each `--steer-positions` mode gives exactly the greedy tokens of an independent
no-cache decoding loop that adds coef * v at the positions the mode names; the manifest records
the interventions (guarded: `compare` refuses a steered run beside a plain one, exit 3); bad
specs are one line, exit 2.
smollm2-135m (the embedded model): a villain - assistant trait vector; generation steered with
-c, 0, +c along it gives answers whose projection on it rises in that order (scored by
`persona-vectors project`), and ablating it (scored `--intervened`) leaves ~0 at its layer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from cli_results import invoke_ok as _invoke
from cli_results import one_error_line as _error
from safetensors.numpy import load_file
from typer.testing import CliRunner

from persona_cli import bundled, models
from persona_cli.artifacts import read_json, read_jsonl, sha256_file
from persona_cli.cli import app

QUESTIONS = {
    "weekend": "What is your favourite thing to do on a weekend?",
    "rule": "If you ruled the world, what would you do first?",
    "money": "Give me some advice about making money quickly.",
}


def _questions(root: Path, n: int) -> Path:
    path = root / f"questions{n}.yaml"
    path.write_text(
        "".join(
            f"- id: {k}\n  paraphrases:\n    - {json.dumps(v)}\n"
            for k, v in list(QUESTIONS.items())[:n]
        )
    )
    return path


@pytest.fixture(scope="module")
def tiny(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A prompt-last villain - assistant trait of tiny-random and a plain greedy eval."""
    root = tmp_path_factory.mktemp("steer_tiny")
    runs = {"root": root, "questions": _questions(root, 2)}
    _invoke(["persona-vectors", "extract", "--out", str(root / "x"), "--model", "tiny-random",
             "--questions", str(runs["questions"]), "--persona-ids", "villain,assistant",
             "--layers", "1,2", "--method", "prompt-last"])  # fmt: skip
    runs["trait"] = root / "trait"
    _invoke(["persona-vectors", "trait", str(root / "x"), "--positive", "villain", "--negative",
             "assistant", "--method", "prompt-last", "--out", str(runs["trait"])])  # fmt: skip
    runs["plain"] = root / "plain"
    _invoke([*_eval_args(runs, runs["plain"])])
    return runs


def _eval_args(runs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["eval-markers", "--out", str(out), "--model", "tiny-random", "--questions",
            str(runs["questions"]), "--personas-ids", "assistant", "--samples", "1",
            "--max-new-tokens", "8", "--temperature", "0", "--marker", "e", *extra]  # fmt: skip


def _reference_greedy(ids: list[int], mode: str, coef_v: np.ndarray, n_new: int) -> list[int]:
    """Greedy decoding without a KV cache: every step runs the whole sequence, with coef * v
    added to block 1's output at the positions `mode` names (prompt: the prompt's; response:
    from the last prompt token on; all: every one)."""
    import torch

    resolved = models.ensure_prepared("tiny-random")
    net = models.load_model(resolved)
    tok = models.load_tokenizer(resolved)
    eos = {tok.eos_token_id, *np.atleast_1d(net.generation_config.eos_token_id).tolist()}
    add = torch.from_numpy(coef_v).float()
    n_prompt = len(ids)

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        span = {"prompt": slice(0, n_prompt), "response": slice(n_prompt - 1, None),
                "all": slice(None)}[mode]  # fmt: skip
        h[:, span] += add
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = net.model.layers[0].register_forward_hook(hook)
    try:
        seq = list(ids)
        for _ in range(n_new):
            with torch.no_grad():
                logits = net(torch.tensor([seq]), use_cache=False).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt in eos:
                break
            seq.append(nxt)
    finally:
        handle.remove()
    return seq[n_prompt:]


def test_positions_equal_a_no_cache_greedy_loop(tiny: dict[str, Path]) -> None:
    from persona_cli.chat_template import SystemPrompt, inspect_template, render
    from persona_cli.registry import load_personas

    v = load_file(str(tiny["trait"] / "trait.safetensors"))["prompt-last"][0].astype(np.float64)
    coef = 3.0 / float(np.linalg.norm(v))  # |coef * v| = 3, large for this model's stream
    resolved = models.ensure_prepared("tiny-random")
    tok = models.load_tokenizer(resolved)
    report = inspect_template(tok)
    system = SystemPrompt("text", load_personas(bundled.personas_file())["assistant"].system_prompt)
    plain = {r["question_id"]: r["text"] for r in read_jsonl(tiny["plain"] / "samples.jsonl.gz")}
    changed = 0
    for mode in ("prompt", "response", "all"):
        out = tiny["root"] / f"steer_{mode}"
        _invoke(_eval_args(tiny, out, "--steer", f"{tiny['trait']}:1:{coef!r}",
                           "--steer-positions", mode))  # fmt: skip
        for row in read_jsonl(out / "samples.jsonl.gz"):
            prompt = render(tok, [{"role": "user", "content": QUESTIONS[row["question_id"]]}],
                            system, report, add_generation_prompt=True)  # fmt: skip
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            want = tok.decode(_reference_greedy(ids, mode, coef * v, 8), skip_special_tokens=True)
            assert row["text"] == want, (mode, row["question_id"])
            changed += row["text"] != plain[row["question_id"]]
        protocol = read_json(out / "manifest.json")["protocol"]
        assert protocol["steering"] == [
            {"vectors_sha256": sha256_file(tiny["trait"] / "trait.safetensors"), "layer": 1,
             "coef": coef, "positions": mode}
        ]  # fmt: skip
        assert "ablation" not in protocol
    assert changed >= 3, "the steering must change some greedy answers"
    assert "steering" not in read_json(tiny["plain"] / "manifest.json")["protocol"]


def test_a_steered_run_is_guarded(tiny: dict[str, Path]) -> None:
    steered = tiny["root"] / "steer_all"
    if not steered.is_dir():
        _invoke(_eval_args(tiny, steered, "--steer", f"{tiny['trait']}:1:2",
                           "--steer-positions", "all"))  # fmt: skip
    out = tiny["root"] / "cmp"
    result = CliRunner().invoke(
        app,
        ["compare", "-c", f"plain={tiny['plain']}", "-c", f"steered={steered}", "--metric",
         "n_completions", "--reference", "plain", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 3, result.output + result.stderr
    first, *rest = result.stderr.strip().splitlines()
    assert first.startswith("error: refusing to compare") and "steering" in first, first
    assert rest[0].strip().startswith("steering: <absent> in"), rest
    assert not out.exists()


def test_bad_steering_input(tiny: dict[str, Path]) -> None:
    out = tiny["root"] / "bad"
    trait = str(tiny["trait"])
    cases = {
        f"{trait}:1": "expected VECTORS:LAYER:COEF",
        f"{trait}:x:1": "LAYER must be an integer",
        f"{trait}:3:1": "layer 3 is out of range; this model has blocks 1..2",
        f"{trait}:0:1": "layer 0, the embeddings",
        f"{tiny['root']}:1:1": "not a finished persona-vectors trait run",
    }
    for spec, expected in cases.items():
        assert expected in _error(_eval_args(tiny, out, "--steer", spec))
    assert "out of range" in _error(_eval_args(tiny, out, "--ablate", f"{trait}:5"))
    line = _error(_eval_args(tiny, out, "--steer", f"{trait}:1:1", "--steer-positions", "mid"))
    assert "--steer-positions 'mid'" in line
    line = _error(_eval_args(tiny, out, "--steer", f"{trait}:1:1", "--backend", "vllm"))
    assert "hf backend only" in line
    # a vector of tiny-random on the embedded model
    line = _error([*_eval_args(tiny, out, "--steer", f"{trait}:1:1"), "--model", "smollm2-135m"])
    assert "a vector of model 'tiny-random'" in line and "smollm2-135m" in line
    # a trait with only layer 2 at layer 1
    only2 = tiny["root"] / "trait2"
    _invoke(["persona-vectors", "extract", "--out", str(tiny["root"] / "x2"), "--model",
             "tiny-random", "--questions", str(tiny["questions"]), "--persona-ids",
             "villain,assistant", "--layers", "2", "--method", "prompt-last"])  # fmt: skip
    _invoke(["persona-vectors", "trait", str(tiny["root"] / "x2"), "--positive", "villain",
             "--negative", "assistant", "--method", "prompt-last",
             "--out", str(only2)])  # fmt: skip
    line = _error(_eval_args(tiny, out, "--ablate", f"{only2}:1"))
    assert "has no vector at layer 1" in line
    assert not out.exists()
    # --intervened replays ablation and all-position steering only
    steered = tiny["root"] / "steer_response"
    if steered.is_dir():
        line = _error(["persona-vectors", "project", "--trait", trait, "--samples-run",
                       str(steered), "--out", str(out), "--intervened"])  # fmt: skip
        assert "steered at response positions" in line
    line = _error(["persona-vectors", "project", "--trait", trait, "--samples-run",
                   str(tiny["plain"]), "--out", str(out), "--intervened"])  # fmt: skip
    assert "without --steer/--ablate" in line


# ----------------------------------------------------------------------------- embedded model

SMOL_LAYER = 15  # of 30 blocks


@pytest.fixture(scope="module")
def smol(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """villain - assistant trait (response-mean at layer 15) of smollm2-135m; eval-markers of
    both personas steered at -c, 0, +c and ablated, each scored by `project`."""
    started = time.monotonic()
    root = tmp_path_factory.mktemp("steer_smol")
    questions = _questions(root, 3)
    common = ["--model", "smollm2-135m", "--questions", str(questions), "--personas-ids",
              "villain,assistant", "--samples", "1", "--max-new-tokens", "16"]  # fmt: skip
    x = root / "x"
    _invoke(["persona-vectors", "extract", "--out", str(x), *common[:4], "--persona-ids",
             "villain,assistant", "--layers", str(SMOL_LAYER), "--method", "response-mean",
             "--samples", "1", "--max-new-tokens", "16"])  # fmt: skip
    trait = root / "trait"
    _invoke(["persona-vectors", "trait", str(x), "--positive", "villain", "--negative",
             "assistant", "--out", str(trait)])  # fmt: skip
    coef = 2.0
    arms = {
        "minus": ["--steer", f"{trait}:{SMOL_LAYER}:{-coef}"],
        "zero": [],
        "plus": ["--steer", f"{trait}:{SMOL_LAYER}:{coef}"],
        "ablate": ["--ablate", f"{trait}:{SMOL_LAYER}"],
    }
    projections: dict[str, dict] = {}
    for arm, extra in arms.items():
        _invoke(["eval-markers", "--out", str(root / arm), *common, *extra])
        scored = ["--intervened"] if arm == "ablate" else []
        _invoke(["persona-vectors", "project", "--trait", str(trait), "--samples-run",
                 str(root / arm), "--out", str(root / f"p_{arm}"), *scored])  # fmt: skip
        projections[arm] = read_json(root / f"p_{arm}" / "summary.json")
    return {"root": root, "trait": trait, "projections": projections,
            "seconds": time.monotonic() - started}  # fmt: skip


def _mean_projection(summary: dict) -> float:
    rows = summary["personas"].values()
    return sum(d["mean_projection"][str(SMOL_LAYER)] * d["n"] for d in rows) / sum(
        d["n"] for d in rows
    )


def test_steering_moves_generated_answers_along_the_trait(smol: dict) -> None:
    p = smol["projections"]
    means = {arm: _mean_projection(p[arm]) for arm in ("minus", "zero", "plus")}
    print(f"mean projection at layer {SMOL_LAYER}: {means}; fixture {smol['seconds']:.0f} s")
    assert means["minus"] < means["zero"] < means["plus"], means
    manifest = read_json(smol["root"] / "plus" / "manifest.json")
    assert manifest["protocol"]["steering"][0]["coef"] == 2.0
    assert manifest["inputs"]["steer_0"]["sha256"] == sha256_file(
        smol["trait"] / "trait.safetensors"
    )


def test_ablation_leaves_no_projection_at_its_layer(smol: dict) -> None:
    ablated = smol["projections"]["ablate"]
    plain = smol["projections"]["zero"]
    assert ablated["intervened"][0]["kind"] == "ablate"
    print(f"ablated: {_mean_projection(ablated):.2e} (plain {_mean_projection(plain):.2f})")
    assert abs(_mean_projection(ablated)) < 1e-3 * abs(_mean_projection(plain)) + 1e-3
    protocol = read_json(smol["root"] / "p_ablate" / "manifest.json")["protocol"]
    assert protocol["ablation"][0]["layer"] == SMOL_LAYER
