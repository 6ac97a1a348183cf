"""persona-vectors extract / similarity / leakage, driven through the real commands on
tiny-random and checked against independent references: an unbatched, unpadded forward loop
for the centroids, numpy for the cosine matrices, scipy.stats for the correlations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_results import invoke_ok as _invoke
from cli_results import one_error_line as _error
from safetensors.numpy import load_file
from scipy import stats

from persona_cli import bundled, models
from persona_cli.artifacts import read_json, read_jsonl
from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.registry import load_personas

PERSONAS = ["assistant", "villain", "pirate", "poet", "paramedic", "sarcastic"]
QUESTIONS = {
    "short": "Hi?",
    "medium": "What is one thing you would change about the world?",
    "long": "Tell me, in your own words and at whatever length you like, what you think about "
    "the future of humans and artificial intelligence living together.",
}


@pytest.fixture(scope="module")
def work(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One extract (both methods, batch size 4), its similarity run, an eval-markers run of
    the same personas and the leakage join of the two."""
    root = tmp_path_factory.mktemp("geometry")
    qfile = root / "questions.yaml"
    qfile.write_text(
        "".join(f"- id: {k}\n  paraphrases:\n    - {json.dumps(v)}\n" for k, v in QUESTIONS.items())
    )
    runs = {"root": root, "questions": qfile}
    runs["extract"] = root / "extract"
    common = ["--model", "tiny-random", "--questions", str(qfile)]
    _invoke(
        ["persona-vectors", "extract", "--out", str(runs["extract"]), *common,
         "--persona-ids", ",".join(PERSONAS), "--layers", "0,all", "--method", "both",
         "--samples", "2", "--max-new-tokens", "6", "--batch-size", "4"]
    )  # fmt: skip
    runs["similarity"] = root / "similarity"
    _invoke(["persona-vectors", "similarity", str(runs["extract"]), "--out",
             str(runs["similarity"]), "--resamples", "200"])  # fmt: skip
    runs["markers"] = root / "markers"
    _invoke(
        ["eval-markers", "--out", str(runs["markers"]), *common, "--personas-ids",
         ",".join(PERSONAS), "--source", "villain", "--samples", "5", "--max-new-tokens", "6",
         "--marker", "in", "--ignore-case"]
    )  # fmt: skip
    runs["leakage"] = root / "leakage"
    _invoke(["persona-vectors", "leakage", "--similarity", str(runs["similarity"]),
             "--markers", str(runs["markers"]), "--out", str(runs["leakage"]),
             "--resamples", "200"])  # fmt: skip
    return runs


def test_centroids_equal_an_unbatched_loop(work: dict[str, Path]) -> None:
    import torch

    resolved = models.ensure_prepared("tiny-random")
    tok, net = models.load_tokenizer(resolved), models.load_model(resolved)
    report = inspect_template(tok)
    registry = load_personas(bundled.personas_file())
    run = work["extract"]
    saved = load_file(str(run / "centroids.safetensors"))
    answers: dict[tuple[str, str], list[str]] = {}
    for row in read_jsonl(run / "samples.jsonl.gz"):
        answers.setdefault((row["persona"], row["question_id"]), []).append(row["text"])
    layers = read_json(run / "summary.json")["layers"]
    assert layers == [0, 1, 2]
    lengths = set()
    expected = {m: np.zeros_like(saved[m], dtype=np.float64) for m in saved}
    for pi, pid in enumerate(PERSONAS):
        for qid, text in QUESTIONS.items():
            prompt = render(
                tok,
                [{"role": "user", "content": text}],
                SystemPrompt("text", registry[pid].system_prompt),
                report,
                add_generation_prompt=True,
            )
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            lengths.add(len(ids))
            with torch.no_grad():
                hs = net(torch.tensor([ids]), output_hidden_states=True).hidden_states
            expected["prompt-last"][pi] += np.stack([hs[la][0, -1].numpy() for la in layers])
            means = []
            for answer in answers[(pid, qid)]:
                resp = tok(answer, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    hs = net(torch.tensor([ids + resp]), output_hidden_states=True).hidden_states
                means.append(np.stack([hs[la][0, -len(resp) :].mean(0).numpy() for la in layers]))
            expected["response-mean"][pi] += np.mean(means, axis=0)
    assert len(lengths) >= 2, "the prompts must differ in length so the batches left-pad"
    for method, tensor in saved.items():
        assert tensor.shape == (len(PERSONAS), 3, net.config.hidden_size)
        np.testing.assert_allclose(tensor, expected[method] / len(QUESTIONS), atol=1e-5)
    rows = read_jsonl(run / "rows.jsonl.gz")
    assert len(rows) == 2 * len(PERSONAS) * len(QUESTIONS)
    assert all(r["schema_version"] == 1 and len(r["norms"]) == 3 for r in rows)
    protocol = read_json(run / "manifest.json")["protocol"]
    assert protocol["geometry_method"] == "both" and protocol["geometry_layers"] == [0, 1, 2]
    assert protocol["samples_per_prompt"] == 2


def _cos(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1)
    out = np.full((len(x), len(x)), np.nan)
    ok = norms > 0
    out[np.ix_(ok, ok)] = (x[ok] @ x[ok].T) / np.outer(norms[ok], norms[ok])
    return out


def test_similarity_equals_numpy(work: dict[str, Path]) -> None:
    doc = read_json(work["similarity"] / "similarity.json")
    centroids = load_file(str(work["extract"] / "centroids.safetensors"))
    ref = PERSONAS.index("assistant")
    off = ~np.eye(len(PERSONAS), dtype=bool)
    for method, c in centroids.items():
        for li, d in enumerate(doc["results"][method]):
            x = c[:, li, :].astype(np.float64)
            want = {"raw": _cos(x), "centred": _cos(x - x.mean(0)), "reference": _cos(x - x[ref])}
            for kind, m in want.items():
                got = np.array(d["matrices"][kind], dtype=float)  # null -> nan
                np.testing.assert_allclose(got, m, atol=1e-6, equal_nan=True)
                mean, finite = d["mean_offdiag"][kind], m[off][np.isfinite(m[off])]
                if finite.size == 0:  # prompt-last at layer 0: one shared token embedding
                    assert mean["estimate"] is None
                    continue
                assert mean["estimate"] == pytest.approx(finite.mean(), abs=1e-6)
                assert mean["low"] - 1e-6 <= mean["estimate"] <= mean["high"] + 1e-6  # rounding
            to_ref = d["to_reference"]["raw"]["pirate"]
            assert to_ref["estimate"] == pytest.approx(want["raw"][2, ref], abs=1e-6)
            assert (work["similarity"] / f"heatmap_{method}_layer{d['layer']:02d}.png").is_file()


def test_leakage_equals_scipy(work: dict[str, Path]) -> None:
    doc = read_json(work["leakage"] / "leakage.json")
    sim = read_json(work["similarity"] / "similarity.json")
    summary = read_json(work["markers"] / "summary.json")
    bystanders = [p for p in summary["personas"] if p != "villain"]
    assert [b["persona"] for b in doc["bystanders"]] == bystanders
    rates = [summary["rates"][p]["rate"] for p in bystanders]
    assert len(set(rates)) > 1, "the marker must vary across bystanders for a correlation"
    si = sim["personas"].index("villain")
    for method in sim["methods"]:
        for layer_sim, layer_leak in zip(
            sim["results"][method], doc["results"][method], strict=True
        ):
            m = layer_sim["matrices"]["centred"]
            cos = [m[si][sim["personas"].index(p)] for p in bystanders]
            if None in cos:  # prompt-last at layer 0: every centred vector is zero
                assert layer_leak["pearson_r"] is None
                continue
            pearson, spearman = stats.pearsonr(cos, rates), stats.spearmanr(cos, rates)
            assert layer_leak["pearson_r"] == pytest.approx(pearson.statistic, abs=1e-9)
            assert layer_leak["pearson_p"] == pytest.approx(pearson.pvalue, abs=1e-9)
            assert layer_leak["spearman_rho"] == pytest.approx(spearman.statistic, abs=1e-9)
            assert layer_leak["spearman_p"] == pytest.approx(spearman.pvalue, abs=1e-9)
            assert (work["leakage"] / layer_leak["scatter"]).is_file()


def test_bad_input(work: dict[str, Path]) -> None:
    out = str(work["root"] / "bad")
    base = ["persona-vectors", "extract", "--out", out, "--model", "tiny-random"]
    line = _error([*base, "--persona-ids", "assistant,nobody"])
    assert "unknown persona 'nobody'" in line and "--persona-ids" in line
    line = _error([*base, "--layers", "0,7"])
    assert "--layers" in line and "out of range" in line and "0..2" in line
    line = _error(["persona-vectors", "similarity", str(work["extract"]), "--out", out,
                   "--reference", "nobody"])  # fmt: skip
    assert "--reference 'nobody'" in line
    assert not Path(out).exists()

    def similarity_of(name: str, model: str, personas: str) -> Path:
        extract, sim = work["root"] / f"{name}_x", work["root"] / f"{name}_s"
        _invoke(["persona-vectors", "extract", "--out", str(extract), "--model", model,
                 "--persona-ids", personas, "--questions", str(work["questions"]),
                 "--limit-questions", "1", "--layers", "0", "--method", "prompt-last"])  # fmt: skip
        _invoke(["persona-vectors", "similarity", str(extract), "--out", str(sim),
                 "--resamples", "10"])  # fmt: skip
        return sim

    few = similarity_of("few", "tiny-random", "assistant,villain,pirate")
    leak = ["persona-vectors", "leakage", "--markers", str(work["markers"]), "--out", out]
    line = _error([*leak, "--similarity", str(few)])
    assert "2 bystander(s) in common" in line
    other = similarity_of("other", models.EMBEDDED, "assistant,villain,pirate,poet")
    line = _error([*leak, "--similarity", str(other)], code=3)
    assert "different models" in line and "smollm2-135m" in line
