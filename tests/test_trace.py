"""replay-trace end to end on tiny-random, a dead endpoint teacher, the budget, bad input."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from persona_cli.artifacts import read_jsonl
from persona_cli.cli import app
from persona_cli.errors import InputError, UserError
from persona_cli.trace.consensus import find_consensus
from persona_cli.trace.prompts import load_prompts
from persona_cli.trace.replay import assemble
from persona_cli.trace.roster import Answerer, load_roster, parse_spec

TINY = "local:tiny-random,max_tokens=6"


class _AlwaysFails:
    """A real HTTP server on 127.0.0.1 that answers every request with HTTP 500 (fault
    injection: the teacher that fails every call)."""

    def __init__(self) -> None:
        self.count = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                outer.count += 1
                body = b'{"error": "down for maintenance"}'
                self.send_response(500)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def dead_server() -> Iterator[_AlwaysFails]:
    s = _AlwaysFails()
    yield s
    s.server.shutdown()


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    rows = [
        {
            "id": f"p{i}",
            "prompt": f"What is {i} plus {i}? Reply with a number.",
            "task": "number",
            "domain": "arithmetic" if i % 2 else "sums",
        }
        for i in range(4)
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def _run(prompt_file: Path, out: Path, *extra: str):
    return CliRunner().invoke(
        app,
        [
            "replay-trace",
            "run",
            "--prompts",
            str(prompt_file),
            "--out",
            str(out),
            "--student",
            f"stud={TINY},persona=villain",
            "--teacher",
            f"t1={TINY},persona=assistant",
            "--teacher",
            f"t2={TINY},persona=paramedic",
            *extra,
        ],
    )


def test_local_replay_with_a_dead_teacher_completes(
    prepared_home, prompt_file, tmp_path, dead_server
) -> None:
    out = tmp_path / "trace"
    r = _run(prompt_file, out, "--teacher", f"dead={dead_server.url},model=m", "--max-retries", "1")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    dead = summary["teachers"]["dead"]
    assert dead["failed_every_call"] and dead["failed"] == 4
    assert any("500" in reason for reason in dead["failure_reasons"])
    assert dead_server.count == 4 * 2  # one try plus one retry per prompt
    assert summary["teachers"]["t1"]["ok"] == 4 and summary["n_prompts"] == 4
    trace = read_jsonl(out / "trace.jsonl.gz")
    assert [t["prompt_id"] for t in trace] == ["p0", "p1", "p2", "p3"]
    for row in trace:
        assert row["teachers"]["dead"]["raw"] is None and row["teachers"]["dead"]["reason"]
        assert set(row["teachers"]) == {"t1", "t2", "dead"}
        assert row["consensus"]["status"] in ("consensus", "tie", "no_quorum", "no_answers")
    pairs = read_jsonl(out / "pairs.jsonl.gz")
    assert len(pairs) == sum(row["pair"] for row in trace)
    # A re-run of the finished run sends nothing; answers were kept.
    again = _run(
        prompt_file, out, "--teacher", f"dead={dead_server.url},model=m", "--max-retries", "1"
    )
    assert again.exit_code == 0 and "already finished" in again.stderr
    assert dead_server.count == 8
    assert sorted(p.name for p in (out / "answers").iterdir()) == [
        "student_stud.jsonl.gz",
        "teacher_t1.jsonl.gz",
        "teacher_t2.jsonl.gz",
    ]


def test_budget_stops_before_spending(prepared_home, prompt_file, tmp_path, dead_server) -> None:
    out = tmp_path / "trace"
    priced = f"paid={dead_server.url},model=m,prompt_price_per_1m=1000,completion_price_per_1m=1000"
    r = _run(prompt_file, out, "--teacher", priced, "--budget-usd", "0.01")
    assert r.exit_code == 1
    assert "budget of $0.01 reached" in r.stderr
    assert dead_server.count == 0  # nothing was sent that could pass the budget
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budget_stopped"] and summary["teachers"]["paid"]["budget_skipped"] == 4
    assert not (out / "DONE").exists()


def test_assemble_writes_pairs_with_provenance() -> None:
    from persona_cli.trace.prompts import TracePrompt

    ps = [TracePrompt("q1", "2+2?", "number", "math"), TracePrompt("q2", "Pick", "mc", "mcq")]
    row = {
        "status": "ok",
        "reason": None,
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "cost_usd": 0.0,
        "cached": False,
    }
    teachers = [
        Answerer("a", "local", "m"),
        Answerer("b", "local", "m"),
        Answerer("c", "local", "m"),
    ]
    t_rows = {
        "a": [{**row, "raw": "4"}, {**row, "raw": "Answer: B"}],
        "b": [{**row, "raw": "<think>2+2</think>4.0"}, {**row, "raw": "(C)"}],
        "c": [{**row, "raw": "five"}, {**row, "raw": None, "status": "failed"}],
    }
    student = [{**row, "raw": "It is 5"}, {**row, "raw": "B"}]
    trace, pairs = assemble(ps, Answerer("s", "local", "m"), student, teachers, t_rows, 0.5)
    assert trace[0]["consensus"]["answer"] == "4" and trace[0]["disagrees"] is True
    assert trace[1]["consensus"]["status"] == "tie" and trace[1]["disagrees"] is None
    assert len(pairs) == 1
    p = pairs[0]
    assert p["chosen"] == [{"role": "assistant", "content": "4"}]
    assert p["rejected"] == [{"role": "assistant", "content": "It is 5"}]
    assert p["prompt"] == [{"role": "user", "content": "2+2?"}]
    prov = p["provenance"]
    assert prov["agreeing"] == ["a", "b"] and prov["chosen_teacher"] == "a"
    assert prov["teacher_raw"]["b"] == "<think>2+2</think>4.0"
    assert prov["usage"]["a"]["completion_tokens"] == 2
    assert find_consensus({"a": "4", "b": "4", "c": None}).status == "consensus"


def test_prompt_formats(tmp_path: Path) -> None:
    from persona_cli import bundled

    mc = load_prompts(bundled.mcq_file(), limit=3)
    assert [p.task for p in mc] == ["mc"] * 3 and mc[0].domain == "mcq"
    assert "A. " in mc[0].text
    qs = load_prompts(bundled.eval_questions_file())
    assert qs[0].task == "free" and qs[0].domain == "questions"
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "a", "prompt": "x", "task": "essay"}\n')
    with pytest.raises(InputError, match=r"p\.jsonl:1: task 'essay' is not one of"):
        load_prompts(bad)


def test_specs_and_roster_errors(tmp_path: Path) -> None:
    t = parse_spec(
        "gpt=https://api.example.com/v1,model=gpt-x,api_key_env=K,prompt_price_per_1m=2.5"
    )
    assert (t.provider, t.base_url, t.model, t.prompt_price_per_1m) == (
        "openai",
        "https://api.example.com/v1",
        "gpt-x",
        2.5,
    )
    local = parse_spec("s=local:smollm2-135m,persona=pirate,adapter=runs/x")
    assert (local.provider, local.model, local.persona, local.adapter) == (
        "local",
        "smollm2-135m",
        "pirate",
        "runs/x",
    )
    with pytest.raises(UserError, match="expected NAME=URL"):
        parse_spec("nonsense")
    roster = tmp_path / "r.yaml"
    roster.write_text("teachers:\n  - name: x\n    provider: openai\n    model: m\n")
    with pytest.raises(InputError, match=r"teachers\[0\]: an openai teacher needs base_url"):
        load_roster(roster)
    assert [t.name for t in load_roster(Path("data/teachers/local.yaml"))] == [
        "smol-assistant",
        "smol-scholar",
        "smol-teacher",
    ]


def test_unknown_persona_is_one_line(prepared_home, prompt_file, tmp_path) -> None:
    r = CliRunner().invoke(
        app,
        [
            "replay-trace",
            "run",
            "--prompts",
            str(prompt_file),
            "--out",
            str(tmp_path / "o"),
            "--teacher",
            f"t={TINY},persona=nobody",
        ],
    )
    assert r.exit_code == 2
    assert "unknown persona(s) 'nobody'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
