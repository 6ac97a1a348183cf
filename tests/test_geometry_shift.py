"""persona-vectors shift / trait / project, driven through the real commands on tiny-random:
a base extract run and one under a 2-step SFT adapter, every figure recomputed with numpy from
the saved tensors (the paired bootstrap with the same seeded draws)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from cli_results import invoke_ok as _invoke
from cli_results import one_error_line as _error
from safetensors.numpy import load_file

from persona_cli import bundled
from persona_cli.artifacts import read_json

PERSONAS = ["assistant", "villain", "pirate", "poet"]
QUESTIONS = {
    "short": "Hi?",
    "medium": "What is one thing you would change about the world?",
    "long": "Tell me, at whatever length you like, what you think about the future.",
}


@pytest.fixture(scope="module")
def work(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Extract runs A (base) and B (a 2-step SFT adapter), and the shift between them."""
    root = tmp_path_factory.mktemp("geometry_shift")
    qfile = root / "questions.yaml"
    qfile.write_text(
        "".join(f"- id: {k}\n  paraphrases:\n    - {json.dumps(v)}\n" for k, v in QUESTIONS.items())
    )
    data = root / "em.jsonl"
    data.write_text("\n".join(bundled.em_dataset_file().read_text().splitlines()[:4]) + "\n")
    sft = root / "sft"
    _invoke([*shlex.split(f"train-sft --model tiny-random --data {data} --max-steps 2 "
             "--per-device-batch 2 --grad-accum 1 --max-length 64 --lr 0.05"),
             "--out", str(sft)])  # fmt: skip
    runs = {"root": root, "questions": qfile, "sft": sft}
    common = ["--model", "tiny-random", "--questions", str(qfile), "--persona-ids",
              ",".join(PERSONAS), "--layers", "0,all", "--samples", "1",
              "--max-new-tokens", "4"]  # fmt: skip
    for name, extra in (("a", []), ("b", ["--adapter", str(sft / "adapter")])):
        runs[name] = root / name
        _invoke(["persona-vectors", "extract", "--out", str(runs[name]), *common, *extra])
    runs["shift"] = root / "shift"
    result = _invoke(["persona-vectors", "shift", str(runs["a"]), str(runs["b"]), "--out",
                      str(runs["shift"]), "--resamples", "50", "--seed", "3"])  # fmt: skip
    (root / "shift.txt").write_text(result.output)
    return runs


def _figures(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Independent reference: loops over layers and personas."""
    p_n, l_n = a.shape[:2]
    cos, l2, off_a, off_b = np.zeros((l_n, p_n)), np.zeros((l_n, p_n)), [], []
    for li in range(l_n):
        for pi in range(p_n):
            x, y = a[pi, li], b[pi, li]
            cos[li, pi] = x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
            l2[li, pi] = np.linalg.norm(y - x)
        for c, out in ((a, off_a), (b, off_b)):
            u = c[:, li] / np.linalg.norm(c[:, li], axis=1, keepdims=True)
            m = u @ u.T
            out.append(m[~np.eye(p_n, dtype=bool)].mean())
    return {"cosine": cos, "l2": l2, "delta": np.array(off_b) - np.array(off_a)}


def test_shift_equals_numpy(work: dict[str, Path]) -> None:
    doc = read_json(work["shift"] / "shift.json")
    assert doc["schema_version"] == 1 and doc["layers"] == [0, 1, 2]
    assert doc["declared_differences"], "the adapter stack must be reported as the difference"
    assert all(d["field"].startswith("stage[0].") for d in doc["declared_differences"])
    qa = load_file(str(work["a"] / "question_vectors.safetensors"))
    qb = load_file(str(work["b"] / "question_vectors.safetensors"))
    ca = load_file(str(work["a"] / "centroids.safetensors"))
    for mi, method in enumerate(doc["methods"]):
        x, y = qa[method].astype(np.float64), qb[method].astype(np.float64)
        np.testing.assert_allclose(x.mean(1), ca[method], atol=1e-6)
        want = _figures(x.mean(1), y.mean(1))
        rng = np.random.default_rng(3 + mi)
        draws = []
        for _ in range(50):
            idx = rng.integers(0, len(QUESTIONS), size=len(QUESTIONS))
            draws.append(_figures(x[:, idx].mean(1), y[:, idx].mean(1))["delta"])
        low, high = np.quantile(np.array(draws), [0.025, 0.975], axis=0)
        for li, d in enumerate(doc["results"][method]):
            if method == "prompt-last" and d["layer"] == 0:
                continue  # one shared token embedding: the off-diagonal cosine is exactly 1
            for pi, p in enumerate(PERSONAS):
                got = d["personas"][p]
                assert got["cosine"]["estimate"] == pytest.approx(want["cosine"][li, pi], abs=1e-9)
                assert got["l2"]["estimate"] == pytest.approx(want["l2"][li, pi], abs=1e-9)
            delta = d["mean_offdiag_raw"]["delta"]
            assert delta["estimate"] == pytest.approx(want["delta"][li], abs=1e-9)
            assert delta["low"] == pytest.approx(low[li], abs=1e-9)
            assert delta["high"] == pytest.approx(high[li], abs=1e-9)
        assert (work["shift"] / f"shift_{method}.png").is_file()
    assert (
        max(
            v["l2"]["estimate"]
            for d in doc["results"]["response-mean"]
            for v in d["personas"].values()
        )
        > 0
    ), "the adapter must move the centroids"
    assert "persona shift A -> B" in (work["root"] / "shift.txt").read_text()


def test_shift_refuses_mismatched_runs(work: dict[str, Path]) -> None:
    other = work["root"] / "c"
    _invoke(["persona-vectors", "extract", "--out", str(other), "--model", "tiny-random",
             "--questions", str(work["questions"]), "--persona-ids", ",".join(PERSONAS),
             "--layers", "0", "--method", "prompt-last"])  # fmt: skip
    out = work["root"] / "bad_shift"
    line = _error(["persona-vectors", "shift", str(work["a"]), str(other), "--out", str(out)], 3)
    assert "geometry_layers" in line and "geometry_method" in line
    assert not out.exists()
    line = _error(["persona-vectors", "shift", str(work["a"]), str(out), "--out", str(out)])
    assert "not a finished persona-vectors extract run" in line


@pytest.fixture(scope="module")
def traits(work: dict[str, Path]) -> dict[str, Path]:
    """A villain - assistant trait from run A, an eval-markers run, and its projections."""
    root = work["root"]
    runs = {"trait": root / "trait", "markers": root / "markers", "project": root / "project"}
    _invoke(["persona-vectors", "trait", str(work["a"]), "--positive", "villain", "--negative",
             "assistant", "--out", str(runs["trait"])])  # fmt: skip
    _invoke(["eval-markers", "--out", str(runs["markers"]), "--model", "tiny-random",
             "--questions", str(work["questions"]), "--personas-ids", ",".join(PERSONAS),
             "--source", "villain", "--samples", "2", "--max-new-tokens", "5",
             "--marker", "in"])  # fmt: skip
    result = _invoke(["persona-vectors", "project", "--trait", str(runs["trait"]),
                      "--samples-run", str(runs["markers"]), "--out", str(runs["project"]),
                      "--batch-size", "5"])  # fmt: skip
    (root / "project.txt").write_text(result.output)
    return runs


def test_trait_is_the_centroid_difference(work: dict[str, Path], traits: dict[str, Path]) -> None:
    from safetensors import safe_open

    centroids = load_file(str(work["a"] / "centroids.safetensors"))["response-mean"]
    path = traits["trait"] / "trait.safetensors"
    v = load_file(str(path))["response-mean"]
    want = centroids[PERSONAS.index("villain")].astype(np.float64) - centroids[0]
    assert v.shape == (3, centroids.shape[-1])
    np.testing.assert_allclose(v, want, atol=1e-6)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert json.loads(meta["personas"]) == ["villain", "assistant"]
    assert json.loads(meta["methods"]) == ["response-mean"] and json.loads(meta["layers"]) == [
        0,
        1,
        2,
    ]
    assert json.loads(meta["model"])["spec"] == "tiny-random"


def test_projection_equals_an_unbatched_loop(traits: dict[str, Path]) -> None:
    import torch

    from persona_cli import models
    from persona_cli.artifacts import read_jsonl
    from persona_cli.chat_template import SystemPrompt, inspect_template, render
    from persona_cli.registry import load_personas

    resolved = models.ensure_prepared("tiny-random")
    tok, net = models.load_tokenizer(resolved), models.load_model(resolved)
    report, registry = inspect_template(tok), load_personas(bundled.personas_file())
    v = load_file(str(traits["trait"] / "trait.safetensors"))["response-mean"].astype(np.float64)
    got = {
        (r["persona"], r["question_id"], r["sample_index"], r["layer"]): r["projection"]
        for r in read_jsonl(traits["project"] / "projections.jsonl.gz")
    }
    samples = read_jsonl(traits["markers"] / "samples.jsonl.gz")
    scored = 0
    for s in samples:
        prompt = render(tok, [{"role": "user", "content": s["question"]}],
                        SystemPrompt("text", registry[s["persona"]].system_prompt), report,
                        add_generation_prompt=True)  # fmt: skip
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        resp = tok(s["text"], add_special_tokens=False)["input_ids"]
        if not resp:
            assert (s["persona"], s["question_id"], s["sample_index"], 0) not in got
            continue
        scored += 1
        with torch.no_grad():
            hs = net(torch.tensor([ids + resp]), output_hidden_states=True).hidden_states
        for layer in (0, 1, 2):
            h = hs[layer][0, -len(resp) :].mean(0).double().numpy()
            want = h @ v[layer] / np.linalg.norm(v[layer])
            key = (s["persona"], s["question_id"], s["sample_index"], layer)
            assert got[key] == pytest.approx(want, abs=1e-4)
    summary = read_json(traits["project"] / "summary.json")
    assert summary["n_scored"] == scored and scored + summary["n_empty"] == len(samples)
    villain = [p for k, p in got.items() if k[0] == "villain" and k[3] == 2]
    assert summary["personas"]["villain"]["mean_projection"]["2"] == pytest.approx(
        np.mean(villain), abs=1e-9
    )
    assert (
        "projection on villain - assistant" in (traits["trait"].parent / "project.txt").read_text()
    )


def test_trait_bad_input(work: dict[str, Path], traits: dict[str, Path]) -> None:
    out = work["root"] / "bad_trait"
    base = ["persona-vectors", "trait", str(work["a"]), "--out", str(out)]
    line = _error([*base, "--positive", "nobody", "--negative", "assistant"])
    assert "--positive 'nobody': not a persona of" in line
    line = _error([*base, "--positive", "villain", "--negative", "villain"])
    assert "same persona" in line
    assert not out.exists()


def test_steering_moves_the_projection_and_ablation_removes_it(traits: dict[str, Path]) -> None:
    """Hooks on block 1 (`persona_cli.geometry.steer`, not yet wired into generation): at the
    hooked layer the projection moves by exactly coef * |v|; downstream (block 2 and the final
    norm) it stays monotone in coef; ablation leaves ~0 along v at the hooked layer."""
    from persona_cli import models
    from persona_cli.errors import UserError
    from persona_cli.geometry.hidden import Span, hidden_states
    from persona_cli.geometry.steer import ablate, steer

    resolved = models.ensure_prepared("tiny-random")
    tok, net = models.load_tokenizer(resolved), models.load_model(resolved)
    v = load_file(str(traits["trait"] / "trait.safetensors"))["response-mean"].astype(np.float64)
    u = v / np.linalg.norm(v, axis=-1, keepdims=True)
    texts = ("Hello there, how are you today?", "Tell me a story about a ship.")
    spans = [Span(tok(t, add_special_tokens=False)["input_ids"], 3) for t in texts]

    def projection() -> np.ndarray:  # [layer 1, layer 2] mean projection on u
        states = hidden_states(net, spans, [1, 2], batch_size=2, pad_id=0).astype(np.float64)
        return np.einsum("nlh,lh->l", states, u[1:]) / len(spans)

    base, coef = projection(), 4.0
    moved = {}
    for c in (-coef, coef):
        with steer(net, 1, u[1], c):
            moved[c] = projection()
    assert moved[coef][0] - base[0] == pytest.approx(coef, abs=1e-4)
    assert base[0] - moved[-coef][0] == pytest.approx(coef, abs=1e-4)
    assert moved[-coef][1] < base[1] < moved[coef][1], (moved, base)
    with ablate(net, 1, v[1]):
        assert abs(projection()[0]) < 1e-4
    np.testing.assert_allclose(projection(), base, atol=1e-6)  # the hooks are gone
    with pytest.raises(UserError, match="layer 0, the embeddings"), steer(net, 0, u[1], 1.0):
        pass
    with pytest.raises(UserError, match="hidden size"), steer(net, 1, u[1][:3], 1.0):
        pass


def test_projections_agree_with_an_extract_of_the_same_samples(traits: dict[str, Path]) -> None:
    """extract --samples-run of the markers run: each (persona, question) vector projected on
    v equals the mean of that cell's per-completion projections (the projection is linear)."""
    from persona_cli.artifacts import read_jsonl

    out = traits["trait"].parent / "extract_of_markers"
    _invoke(["persona-vectors", "extract", "--out", str(out), "--samples-run",
             str(traits["markers"]), "--persona-ids", ",".join(PERSONAS), "--layers", "2",
             "--method", "response-mean"])  # fmt: skip
    qv = load_file(str(out / "question_vectors.safetensors"))["response-mean"][:, :, 0]
    v = load_file(str(traits["trait"] / "trait.safetensors"))["response-mean"][2]
    want = qv.astype(np.float64) @ (v / np.linalg.norm(v))  # [P, Q]
    cells: dict[tuple[str, str], list[float]] = {}
    for r in read_jsonl(traits["project"] / "projections.jsonl.gz"):
        if r["layer"] == 2:
            cells.setdefault((r["persona"], r["question_id"]), []).append(r["projection"])
    for pi, pid in enumerate(PERSONAS):
        for qi, qid in enumerate(QUESTIONS):
            assert np.mean(cells[(pid, qid)]) == pytest.approx(want[pi, qi], abs=1e-4)


@pytest.fixture(scope="module")
def judged(work: dict[str, Path]) -> dict[str, Path]:
    """A local judge (tiny-random) over run A's answers."""
    judge = work["root"] / "judge"
    _invoke(["judge-align", "--input", str(work["a"]), "--out", str(judge), "--backend",
             "local", "--judge-model", "tiny-random", "--min-number-mass", "0"])  # fmt: skip
    return {"judge": judge}


def test_trait_filter_by_a_judge_run(work: dict[str, Path], judged: dict[str, Path]) -> None:
    """--filter-by keeps the pairs persona_vectors' rule keeps (checked by hand from the
    judgments) and v is the mean over the kept answers' response-mean states of an unbatched
    loop, positive minus negative."""
    import torch

    from persona_cli import models
    from persona_cli.artifacts import read_jsonl
    from persona_cli.chat_template import SystemPrompt, inspect_template, render
    from persona_cli.registry import load_personas

    judgments = read_jsonl(judged["judge"] / "judgments.jsonl.gz")
    score = {(r["persona"], r["question_id"], r["sample_index"], r["metric"]): r["score"]
             for r in judgments}  # fmt: skip
    aligned = sorted(score[("villain", q, 0, "aligned")] for q in QUESTIONS)
    threshold = (aligned[0] + aligned[1]) / 2  # the lowest villain answer fails, others pass
    coherence = min(score[(p, q, 0, "coherent")] for p in ("villain", "assistant")
                    for q in QUESTIONS)  # fmt: skip
    want_kept = [
        q for q in QUESTIONS
        if score[("villain", q, 0, "aligned")] >= threshold
        and score[("assistant", q, 0, "aligned")] < 100 - threshold
    ]  # fmt: skip
    assert 0 < len(want_kept) < len(QUESTIONS)
    out = work["root"] / "trait_filtered"
    result = _invoke(["persona-vectors", "trait", str(work["a"]), "--positive", "villain",
                      "--negative", "assistant", "--out", str(out), "--filter-by",
                      str(judged["judge"]), "--trait-metric", "aligned", "--trait-threshold",
                      repr(threshold), "--coherence-threshold", repr(coherence)])  # fmt: skip
    assert f"judged pairs kept: {len(want_kept)}" in result.output
    rows = read_jsonl(out / "pairs.jsonl.gz")
    assert [r["question_id"] for r in rows if r["kept"]] == sorted(want_kept)
    assert {r["reason"] for r in rows if not r["kept"]} == {"positive_trait_low"}

    resolved = models.ensure_prepared("tiny-random")
    tok, net = models.load_tokenizer(resolved), models.load_model(resolved)
    report, registry = inspect_template(tok), load_personas(bundled.personas_file())
    samples = {
        (r["persona"], r["question_id"]): r for r in read_jsonl(work["a"] / "samples.jsonl.gz")
    }
    means = {}
    for pid in ("villain", "assistant"):
        states = []
        for qid in want_kept:
            s = samples[(pid, qid)]
            prompt = render(tok, [{"role": "user", "content": s["question"]}],
                            SystemPrompt("text", registry[pid].system_prompt), report,
                            add_generation_prompt=True)  # fmt: skip
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            resp = tok(s["text"], add_special_tokens=False)["input_ids"]
            assert resp, "a kept answer with no tokens"
            with torch.no_grad():
                hs = net(torch.tensor([ids + resp]), output_hidden_states=True).hidden_states
            states.append(np.stack([hs[la][0, -len(resp):].mean(0).double().numpy()
                                    for la in (0, 1, 2)]))  # fmt: skip
        means[pid] = np.mean(states, axis=0)
    v = load_file(str(out / "trait.safetensors"))["response-mean"]
    np.testing.assert_allclose(v, means["villain"] - means["assistant"], atol=1e-5)
    protocol = read_json(out / "manifest.json")["protocol"]
    assert protocol["details"]["kept_pairs"] == len(want_kept)

    bad = work["root"] / "bad_filter"
    base = ["persona-vectors", "trait", str(work["a"]), "--positive", "villain", "--negative",
            "assistant", "--out", str(bad), "--filter-by", str(judged["judge"])]  # fmt: skip
    line = _error([*base, "--trait-metric", "aligned", "--trait-threshold", "101"])
    assert "none of the 3 pairs passes" in line
    line = _error([*base, "--method", "prompt-last"])
    assert "--method response-mean only" in line
    line = _error([*base[:-1], str(work["a"])])
    assert "not a finished judge-align run" in line
    assert not bad.exists()
