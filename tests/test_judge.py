"""judge-align end to end through the CLI: faults, resume, secrets, bad input, local backend.

    python -m pytest tests/test_judge.py -q

API judges run against tests/chat_api_fault_server.py (a real HTTP server on 127.0.0.1 whose
faults are picked by directives in the request text, here written into the answers). The local
backend runs on the tiny-random model and is checked against a plain transformers forward.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import orjson
import pytest

from persona_cli.artifacts import read_json, read_jsonl, sha256_file, write_jsonl
from persona_cli.cli import app
from persona_cli.guard import check_protocols, protocol_of
from persona_cli.judge.prompts import load_judge_prompts
from persona_cli.schemas import JUDGMENTS

HERE = Path(__file__).resolve().parent
KEY_ENV = "PERSONA_JUDGE_TEST_KEY"
SECRET = "sk-judge-test-7f3a9c2e5b1d"  # distinctive, grepped for in every artifact and log


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fault_server = _load("chat_api_fault_server")


def expected_fault_server_score(first: int = 7, k: int = 20) -> float:
    """What the fault server's top-k (tokens (first + i) % 10, logprob -0.5 i - 0.125) means."""
    ps = [math.exp(-0.5 * i - 0.125) for i in range(k)]
    return sum(((first + i) % 10) * p for i, p in enumerate(ps)) / sum(ps)


@pytest.fixture
def server():
    with fault_server.FaultServer() as s:
        yield s


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


def write_answers(path: Path, answers: list[str], persona: str | None = None) -> Path:
    rows = [
        {"id": f"a{i}", "question": f"Question number {i}?", "answer": a}
        | ({"persona": persona} if persona else {})
        for i, a in enumerate(answers)
    ]
    write_jsonl(path, rows)
    return path


def api_args(server, inp: Path, out: Path, *extra: str) -> list[str]:
    return [
        "judge-align",
        "--input",
        str(inp),
        "--out",
        str(out),
        "--judge-model",
        "judge-m",
        "--base-url",
        f"{server.url}/v1",
        "--api-key-env",
        KEY_ENV,
        "--max-retries",
        "3",
        "--timeout",
        "3.0",
        "--id-column",
        "id",
        *extra,
    ]


def all_bytes(root: Path) -> bytes:
    """Every file under root, gzip members decompressed, so a key inside them is visible."""
    chunks = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            chunks.append(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return b"\n".join(chunks)


RETRIED = ["{500*2}", "{slow:4.5*1}", "{badjson*1}", "{drop*1}", "{echokey:500*1}", "{429:0*1}"]
FAILING = ["{500}", "{drop}", "{nologprobs}"]
HEALTHY = ["A kind and helpful answer.", "Another calm answer.", "Plant a tree."]


def test_faults_rows_retried_or_unscored_none_zero_none_lost_no_key(
    cli, server, tmp_path: Path
) -> None:
    answers = HEALTHY + RETRIED + FAILING
    inp = write_answers(tmp_path / "answers.jsonl", answers)
    out = tmp_path / "run"
    res = cli.invoke(app, api_args(server, inp, out, "--max-failure-rate", "0.5"))
    assert res.exit_code == 0, res.output
    rows = read_jsonl(out / "judgments.jsonl.gz", JUDGMENTS.check)
    # None lost: one row per (answer, metric), in input order.
    assert [(r["sample_key"], r["metric"]) for r in rows] == [
        (f"a{i}", m) for i in range(len(answers)) for m in ("aligned", "coherent")
    ]
    expected = expected_fault_server_score()
    for r in rows:
        failing = any(d in r["answer"] for d in FAILING)
        if failing:
            assert r["score"] is None and r["unscored_reason"] == "request_failed", r
            assert r["detail"], r
        else:
            # Retried until it worked; the score is what the judge's logprobs say, never 0.
            assert r["score"] == pytest.approx(expected, rel=1e-12), r
            assert len(r["top_logprobs"]) == 20
        assert r["score"] != 0
    by_answer = {r["answer"]: r for r in rows if r["metric"] == "aligned"}
    assert by_answer["{500*2}"]["attempts"] == 3
    assert "missing_logprobs" in by_answer["{nologprobs}"]["detail"]
    assert "HTTP 500" in by_answer["{500}"]["detail"]
    summary = read_json(out / "summary.json")
    assert summary["metrics"]["aligned"]["unscored"]["by_reason"] == {"request_failed": 3}
    assert summary["usage"]["by_model"]["judge-m"]["requests"] == 2 * (len(answers) - 3)
    manifest = read_json(out / "manifest.json")
    assert set(manifest["protocol"]) == {
        "judge_backend",
        "judge_model",
        "judge_prompt_sha256",
        "judge_scoring",
        "judge_min_number_mass",
        "details",
    }
    assert manifest["protocol"]["judge_model"] == "judge-m"
    assert rows[0]["prompt_sha256"] == load_judge_prompts(None).template_sha256("aligned")
    assert (out / "DONE").is_file()
    # The server did receive the key (and echoed it in a 500 body); nothing we wrote keeps it.
    assert any(SECRET in str(e["headers"]) for e in server.log)
    assert "[REDACTED]" in res.output  # the retry warning quoted the echo, redacted
    assert SECRET.encode() not in all_bytes(out)
    assert SECRET not in res.output


def test_rerun_sends_only_what_failed(cli, server, tmp_path: Path) -> None:
    answers = [*HEALTHY, "{500}", "{drop}"]
    inp = write_answers(tmp_path / "answers.jsonl", answers)
    cache = tmp_path / "shared_cache.sqlite"
    first = cli.invoke(
        app,
        api_args(server, inp, tmp_path / "a", "--cache", str(cache), "--max-failure-rate", "0.9"),
    )
    assert first.exit_code == 0, first.output
    failed = [r for r in read_jsonl(tmp_path / "a" / "judgments.jsonl.gz") if r["score"] is None]
    assert len(failed) == 4
    # Re-running the finished run is a no-op: no request at all.
    server.reset_log()
    again = cli.invoke(
        app,
        api_args(server, inp, tmp_path / "a", "--cache", str(cache), "--max-failure-rate", "0.9"),
    )
    assert again.exit_code == 0 and "already finished" in again.output
    assert server.log == []
    # A new run over the same cache, server healthy: only the 4 failed readings are requested.
    server.faults_enabled = False
    second = cli.invoke(app, api_args(server, inp, tmp_path / "b", "--cache", str(cache)))
    assert second.exit_code == 0, second.output
    assert sorted(server.contents()) == sorted(
        c for c in set(server.contents()) if "{500}" in c or "{drop}" in c
    )
    assert len(server.log) == 4
    rows = read_jsonl(tmp_path / "b" / "judgments.jsonl.gz")
    assert all(r["score"] is not None for r in rows)
    assert sum(r["from_cache"] for r in rows) == 2 * len(HEALTHY)


def test_failure_rate_abort_then_resume_sends_no_request_twice(cli, server, tmp_path: Path) -> None:
    answers = [f"Healthy answer {i}." for i in range(10)] + ["{503}"] * 1 + ["{500}", "{502}"]
    inp = write_answers(tmp_path / "answers.jsonl", answers)
    out = tmp_path / "run"
    args = api_args(server, inp, out, "--max-concurrency", "2", "--max-retries", "1")
    first = cli.invoke(app, args)
    assert first.exit_code == 2, first.output
    errors = [ln for ln in first.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "max_failure_rate" in errors[0], first.stderr
    assert not (out / "DONE").exists() and not (out / "judgments.jsonl.gz").exists()
    ok_first = {e["content"] for e in server.log} - {c for c in server.contents() if "{50" in c}
    server.faults_enabled = False
    server.reset_log()
    second = cli.invoke(app, args)
    assert second.exit_code == 0, second.output
    resent = server.contents()
    assert len(resent) == len(set(resent))
    # Nothing that succeeded the first time was asked again.
    assert not (set(resent) & ok_first)
    assert len(resent) + len(ok_first) == 2 * len(answers)
    rows = read_jsonl(out / "judgments.jsonl.gz", JUDGMENTS.check)
    assert len(rows) == 2 * len(answers) and all(r["score"] is not None for r in rows)


def test_anthropic_parsed_mode_unparsable_is_unscored_with_reply_kept(
    cli, server, tmp_path: Path
) -> None:
    inp = write_answers(tmp_path / "answers.jsonl", ["Hello there."])
    res = cli.invoke(
        app,
        [
            *api_args(server, inp, tmp_path / "run"),
            "--backend",
            "anthropic",
            "--base-url",
            server.url,
            "--metric",
            "coherent",
        ],
    )
    assert res.exit_code == 0, res.output
    (row,) = read_jsonl(tmp_path / "run" / "judgments.jsonl.gz", JUDGMENTS.check)
    assert row["scoring"] == "parsed" and row["score"] is None
    assert row["unscored_reason"] == "unparsable_reply" and row["reply"].startswith("ok:")
    assert server.log[0]["path"] == "/v1/messages"
    assert server.log[0]["headers"]["x-api-key"] == SECRET
    assert SECRET.encode() not in all_bytes(tmp_path / "run")


def test_samples_input_keeps_personas_and_breaks_down(
    cli, server, prepared_home, tmp_path: Path
) -> None:
    # A real eval-markers run (tiny-random): its protocol must travel into the judge run's.
    questions = tmp_path / "questions.yaml"
    questions.write_text(
        "- id: q0\n  paraphrases: ['Question 0?']\n- id: q1\n  paraphrases: ['Question 1?']\n"
    )
    gen = tmp_path / "gen"
    made = cli.invoke(
        app,
        [
            "eval-markers",
            "--out",
            str(gen),
            "--model",
            "tiny-random",
            "--personas-ids",
            "villain,assistant",
            "--questions",
            str(questions),
            "--samples",
            "1",
            "--max-new-tokens",
            "4",
        ],
    )
    assert made.exit_code == 0, made.output
    template_sha = read_json(gen / "manifest.json")["chat_template"]["template_sha256"]
    out = tmp_path / "judge"
    res = cli.invoke(app, api_args(server, gen, out)[:-2])  # a run dir; no --id-column
    assert res.exit_code == 0, res.output
    judged = read_jsonl(out / "judgments.jsonl.gz", JUDGMENTS.check)
    assert sorted(r["sample_key"] for r in judged[::2]) == [
        "assistant/q0/0",
        "assistant/q1/0",
        "villain/q0/0",
        "villain/q1/0",
    ]
    summary = read_json(out / "summary.json")
    assert set(summary["by_persona"]) == {"villain", "assistant"}
    assert summary["by_persona"]["villain"]["metrics"]["coherent"]["n"] == 2
    proto = protocol_of(out)
    assert proto["temperature"] == 1.0 and proto["samples_per_prompt"] == 1
    assert proto["question_set_sha256"] == sha256_file(questions)
    assert proto["chat_template_sha256"] == template_sha
    assert proto["judge_model"] == "judge-m"
    # Another judge prompt (here its system prompt) is a protocol difference compare refuses.
    strict = tmp_path / "judge_strict"
    res = cli.invoke(
        app, [*api_args(server, gen, strict)[:-2], "--judge-system-prompt", "Be strict."]
    )
    assert res.exit_code == 0, res.output
    refused, _ = check_protocols({"a": proto, "b": protocol_of(strict)}, set())
    assert [d.field for d in refused] == ["judge_prompt_sha256"]
    assert server.log[-1]["payload"]["messages"][0] == {"role": "system", "content": "Be strict."}


def _one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "Traceback" not in res.output
    return lines[0]


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        (
            "judge_prompts:\n  aligned: 'Rate {answer} for {persona}'\n",
            "unknown placeholder {persona}",
        ),
        ("judge_prompts:\n  aligned: 'Rate {question}'\n", "has no {answer} placeholder"),
        ("judge_prompts:\n  evil: 'Rate {answer}'\n", "unknown key 'evil'"),
        ("judge_prompts:\n  aligned: 'Rate {answer} {'\n", "literal braces"),
        ("prompts:\n  aligned: 'Rate {answer}'\n", "unknown top-level key(s) 'prompts'"),
        ("judge_prompts:\n  coherent: 'Rate {answer}'\n", "has no aligned prompt"),
    ],
)
def test_bad_judge_prompts_are_one_line_errors(
    cli, server, tmp_path: Path, prompts: str, message: str
) -> None:
    pfile = tmp_path / "judges.yaml"
    pfile.write_text(prompts)
    inp = write_answers(tmp_path / "answers.jsonl", ["x"])
    res = cli.invoke(app, api_args(server, inp, tmp_path / "out", "--judge-prompts", str(pfile)))
    line = _one_error_line(res)
    assert message in line and str(pfile) in line
    assert not (tmp_path / "out").exists() and server.log == []


def test_bad_inputs_are_one_line_errors(cli, server, tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    write_jsonl(missing, [{"id": "a", "question": "q?", "response": "r"}])
    line = _one_error_line(cli.invoke(app, api_args(server, missing, tmp_path / "o1")))
    assert f"{missing}:1: missing column 'answer'" in line
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = _one_error_line(cli.invoke(app, api_args(server, empty, tmp_path / "o2")))
    assert "no rows to judge" in line
    csv_file = tmp_path / "answers.csv"
    csv_file.write_text("id,question,text\na,q?,r\n")
    line = _one_error_line(cli.invoke(app, api_args(server, csv_file, tmp_path / "o3")))
    assert "missing column 'answer'" in line and str(csv_file) in line
    line = _one_error_line(
        cli.invoke(app, api_args(server, csv_file, tmp_path / "o4", "--backend", "gemini"))
    )
    assert "--backend 'gemini'" in line
    line = _one_error_line(
        cli.invoke(
            app,
            [
                "judge-align",
                "-i",
                str(csv_file),
                "-o",
                str(tmp_path / "o5"),
                "--answer-column",
                "text",
                "--backend",
                "local",
                "--judge-model",
                str(tmp_path / "no" / "such" / "model"),
            ],
        )
    )
    assert "no/such/model" in line
    # Betley et al. question files with their own judge_prompts load unchanged.
    betley = tmp_path / "questions.yaml"
    betley.write_text(
        "- id: q1\n  paraphrases: [hi]\n  judge_prompts:\n    aligned: 'A {question} {answer}'\n"
        "    coherent: 'C {question} {answer}'\n"
        "- id: q2\n  paraphrases: [yo]\n  judge_prompts:\n    aligned: 'A {question} {answer}'\n"
        "    coherent: 'C {question} {answer}'\n"
    )
    assert load_judge_prompts(betley).render("coherent", "Q", "{answer}") == "C Q {answer}"
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
    assert server.log == []


def test_missing_key_for_a_remote_endpoint(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    inp = write_answers(tmp_path / "answers.jsonl", ["x"])
    res = cli.invoke(
        app,
        [
            "judge-align",
            "-i",
            str(inp),
            "-o",
            str(tmp_path / "o"),
            "--judge-model",
            "gpt-4o",
            "--api-key-env",
            KEY_ENV,
        ],
    )
    assert KEY_ENV in _one_error_line(res)
    assert not (tmp_path / "o").exists()


def test_local_backend_matches_a_plain_forward_and_resumes(
    cli, prepared_home: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persona_cli.models import TINY, builtin_path

    # Different lengths, so batching pads; the plain forward below runs one prompt at a time.
    answers = ["Short.", "A much longer answer that goes on for a while, with several clauses."]
    inp = write_answers(tmp_path / "answers.jsonl", answers, persona="assistant")
    cache = tmp_path / "cache.sqlite"
    args = [
        "judge-align",
        "-i",
        str(inp),
        "--id-column",
        "id",
        "--backend",
        "local",
        "--judge-model",
        TINY,
        "--batch-size",
        "2",
        "--min-number-mass",
        "0",
        "--cache",
        str(cache),
    ]
    res = cli.invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    rows = read_jsonl(tmp_path / "a" / "judgments.jsonl.gz", JUDGMENTS.check)
    assert len(rows) == 4

    tok = AutoTokenizer.from_pretrained(builtin_path(TINY))
    net = AutoModelForCausalLM.from_pretrained(builtin_path(TINY), dtype=torch.float32)
    prompts = load_judge_prompts(None)
    digits = {str(d): tok.convert_tokens_to_ids(str(d)) for d in range(10)}
    for r in rows:
        # The default judge system prompt sends the user message alone, so SmolLM2's template
        # adds its own default system prompt, as a server applying it would.
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompts.render(r["metric"], r["question"], r["answer"])}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert "You are a helpful AI assistant named SmolLM" in text
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = net(ids).logits[0, -1].float().log_softmax(-1)
        got = {t["token"]: t["logprob"] for t in r["number_logprobs"]}
        assert set(got) == set(digits)
        for d, i in digits.items():
            assert got[d] == pytest.approx(float(logp[i]), abs=1e-4)
        p = {d: math.exp(float(logp[i])) for d, i in digits.items()}
        assert r["score"] == pytest.approx(
            sum(int(d) * q for d, q in p.items()) / sum(p.values()), rel=1e-4
        )
        assert r["number_mass"] == pytest.approx(sum(p.values()), rel=1e-4)
    manifest = read_json(tmp_path / "a" / "manifest.json")
    assert manifest["number_vocab"]["values"] == list(range(10))
    assert manifest["judge_chat_template"]["injects_default_system_prompt"] is True
    # A second run over the same cache computes nothing.
    res = cli.invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    again = read_jsonl(tmp_path / "b" / "judgments.jsonl.gz")
    assert all(r["from_cache"] for r in again)
    assert [r["score"] for r in again] == [r["score"] for r in rows]
    assert orjson.loads(orjson.dumps(read_json(tmp_path / "b" / "summary.json")))["n_rows"] == 4
