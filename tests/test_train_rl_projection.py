"""train-grpo --vhack: the projected update, on tiny-random.

Run: python -m pytest tests/test_train_rl_projection.py -q

- the training projection (persona_cli.train.projection) equals `probe replay --projected`'s on
  the same gradient, to 1e-6, for both adapters and both rules, and leaves no v_hack component
  in any module where it fired;
- real runs (the DPO term gives every step a gradient): with a v_hack orthogonal to the
  gradient by construction (only LoRA A parts, whose gradient is exactly 0 at B = 0) the run is
  identical to one without --vhack; with the extracted v_hack and `always` it differs; every
  logged step has cos_out <= 0 (up to float rounding) where the projection fired;
- the svd adapter trains, is saved, and reloads as W + U diag(delta) V^T;
- bad input: a v_hack of another model or adapter, a generator share that does not divide the
  group, missing sandbox problems: one line, exit 2, no run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from rl_helpers import SMALL, edited_vhack, invoke, ok, one_error_line, perturbed_copy, write_pairs
from safetensors.torch import load_file
from test_probe_pool import write_pool

from persona_cli import models
from persona_cli.adapters import load_with_adapters, resolve_stack
from persona_cli.artifacts import read_json, read_jsonl
from persona_cli.models import load_model, load_tokenizer, resolve
from persona_cli.probe.adapters import build_adapter
from persona_cli.probe.config import AdapterConfig, ReplayConfig
from persona_cli.probe.encoding import encode
from persona_cli.probe.grads import per_sample_grads
from persona_cli.probe.pool import read_pool
from persona_cli.probe.replay import replay_step
from persona_cli.schemas import STEP
from persona_cli.train.projection import UpdateProjector, adapter_gradient, set_adapter_gradient
from persona_cli.train.rl_log import RL_LOG

COS_TOL = 1e-6  # a projected module's cos_out is 0 up to float32 rounding (~1e-8 seen)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()  # busy shared cores: see tests/test_train_grpo.py
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def root(persona_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    models.prepare([models.TINY])
    return tmp_path_factory.mktemp("rlproj")


@pytest.fixture(scope="module")
def pool(root: Path) -> Path:
    return write_pool(root / "pool", load_tokenizer(resolve("tiny-random")))


@pytest.fixture(scope="module")
def vhacks(root: Path, pool: Path) -> dict[str, Path]:
    out = {}
    for kind in ("lora", "svd"):
        out[kind] = root / f"vhack_{kind}"
        ok("extract-vhack", "--pool", pool, "-m", "tiny-random", "--adapter", kind,
           "--rank", 4, "--alpha", 8, "--out", out[kind])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def pairs(root: Path) -> Path:
    return write_pairs(root / "pairs.jsonl")


# ----------------------------------------------------------------------------- one projection


def _moved_adapter(kind: str) -> Any:
    adapter = build_adapter(
        load_model(resolve("tiny-random"), dtype="float32", device="cpu"),
        AdapterConfig(kind=kind, rank=4, alpha=8.0),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the init, so every tensor has a gradient
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return adapter


@pytest.mark.parametrize("kind", ["lora", "svd"])
@pytest.mark.parametrize("rule", ["positive", "always"])
def test_training_projection_equals_the_replays(pool: Path, kind: str, rule: str) -> None:
    tok = load_tokenizer(resolve("tiny-random"))
    adapter = _moved_adapter(kind)
    row = next(r for r in read_pool(pool)[0] if r.completion.strip())
    g = per_sample_grads(
        adapter, [encode(tok, row.prompt, row.completion, max_length=1024)], tok.pad_token_id
    ).grads[0]
    # v: each module's gradient, sign flipped on every other module, plus noise: by
    # construction some modules point along g (they fire under "positive") and some against.
    noise = torch.randn(adapter.size, generator=torch.Generator().manual_seed(1))
    v = torch.empty(adapter.size)
    for i, m in enumerate(adapter.modules):
        sl = adapter.module_slices[m]
        v[sl] = (1.0 if i % 2 == 0 else -1.0) * g[sl] + 0.3 * noise[sl] * g[sl].norm() / (
            noise[sl].norm() + 1e-12
        )
    replay_rows, update = replay_step(
        adapter, v, tok, [row], ReplayConfig(projected=True, project_when=rule, loss="nll")
    )
    assert update is not None

    set_adapter_gradient(adapter, g)  # the optimizer step's gradient, as the trainer holds it
    record = UpdateProjector(adapter, v, rule, list(adapter.modules)).apply()
    projected = adapter_gradient(adapter)
    torch.testing.assert_close(projected, update.float(), rtol=0, atol=1e-6)

    replayed = replay_rows[0]
    fired = {m for m, (_, _, f) in record["projection"].items() if f}
    assert fired == {m for m, f in replayed["fired"].items() if f}
    assert 0 < len(fired) <= len(adapter.modules)
    if rule == "positive":
        assert len(fired) < len(adapter.modules)
    for m, (c_in, c_out, _) in record["projection"].items():
        assert c_in == pytest.approx(replayed["cos_in"][m], abs=1e-6)
        assert c_out == pytest.approx(replayed["cos_out"][m], abs=1e-6)
    for m in adapter.modules:  # no v_hack component left in a fired module; others untouched
        sl = adapter.module_slices[m]
        if m in fired:
            cos = torch.dot(projected[sl].double(), v[sl].double()) / (
                projected[sl].double().norm() * v[sl].double().norm()
            )
            assert abs(float(cos)) < COS_TOL, (m, float(cos))
        else:
            assert torch.equal(projected[sl], g[sl])


# ----------------------------------------------------------------------------- real runs


def _grpo(out: Path, *extra: Any, steps: int = 1, pairs: Path) -> Path:
    ok("train-grpo", *SMALL, "--reward", "mc", "--max-steps", steps, "--dpo-pairs", pairs,
       "--dpo-weight", 1.0, *extra, "--out", out)  # fmt: skip
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_projection_never_firing_is_a_no_op_and_firing_is_not(
    root: Path, vhacks: dict[str, Path], pairs: Path
) -> None:
    # A parts random, B parts 0: at LoRA's init (B = 0) the gradient of every A is exactly 0,
    # so g . v = 0 in every module and the positive rule cannot fire.
    gen = torch.Generator().manual_seed(3)
    orthogonal = edited_vhack(
        vhacks["lora"],
        root / "vhack_orthogonal",
        lambda key, t: torch.randn(t.shape, generator=gen) if key.endswith("lora_A") else 0 * t,
    )
    plain = _grpo(root / "plain", pairs=pairs)
    never = _grpo(root / "never", "--vhack", orthogonal, "--project", "positive", pairs=pairs)
    fires = _grpo(root / "fires", "--vhack", vhacks["lora"], "--project", "always", pairs=pairs)

    never_log = read_jsonl(never / "rl_log.jsonl.gz", RL_LOG.check)
    assert [r["proj_frac_fired"] for r in never_log] == [0.0]
    a, b, c = _weights(plain), _weights(never), _weights(fires)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical adapters
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert read_jsonl(plain / "step_000001.jsonl.gz", STEP.check) == read_jsonl(
        never / "step_000001.jsonl.gz", STEP.check
    )
    plain_log = read_jsonl(plain / "rl_log.jsonl.gz", RL_LOG.check)
    assert plain_log[0]["loss"] == never_log[0]["loss"] and "proj_cos_in" not in plain_log[0]
    fires_log = read_jsonl(fires / "rl_log.jsonl.gz", RL_LOG.check)
    assert fires_log[0]["proj_frac_fired"] > 0
    protocol = read_json(fires / "manifest.json")["protocol"]
    assert protocol["projection"] == "always" and len(protocol["projection_vhack_sha256"]) == 64
    assert read_json(plain / "manifest.json")["protocol"]["projection"] == "off"


@pytest.mark.parametrize("kind", ["lora", "svd"])
def test_every_logged_step_has_cos_out_le_0_where_fired(
    root: Path, vhacks: dict[str, Path], pairs: Path, kind: str
) -> None:
    run = _grpo(root / f"pos_{kind}", "--adapter-kind", kind, "--vhack", vhacks[kind],
                "--project", "positive", steps=2, pairs=pairs)  # fmt: skip
    log = read_jsonl(run / "rl_log.jsonl.gz", RL_LOG.check)
    train_log = read_jsonl(run / "train_log.jsonl.gz")
    assert [r["step"] for r in log] == [1, 2]
    worst = max(
        (co for r in log for _, co, fired in r["projection"].values() if fired),
        default=None,
    )
    print(f"\n{kind}: largest cos_out over fired modules {worst}")
    for r, t in zip(log, train_log, strict=True):
        assert r["projection"], "every module had an undefined cosine"
        for m, (c_in, c_out, fired) in r["projection"].items():
            assert fired == (c_in > 0)
            assert c_out <= COS_TOL if fired else c_out == c_in <= 0, (m, c_in, c_out)
        assert t["proj_cos_out"] == r["proj_cos_out"] <= r["proj_cos_in"]
        assert t["proj_frac_fired"] == r["proj_frac_fired"]
    if kind == "svd":  # saved, reloadable: W' = W + U_r diag(delta) V_r^T, and it moved
        saved = _weights(run)
        assert read_json(run / "manifest.json")["protocol"]["adapter_kind"] == "svd"
        merged = load_with_adapters(resolve("tiny-random"), resolve_stack([run]), dtype="float32")
        base = load_model(resolve("tiny-random"), dtype="float32")
        name = "model.layers.0.self_attn.q_proj"
        u, v, d = (saved[f"{name}.{k}"] for k in ("u_r", "v_r", "delta"))
        assert d.abs().max() > 0
        w = base.get_submodule(name).weight + u @ torch.diag(d) @ v.T
        torch.testing.assert_close(merged.get_submodule(name).weight, w)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_exit_2(root: Path, vhacks: dict[str, Path], pairs: Path):
    other = perturbed_copy(resolve("tiny-random").path, root / "other_model", seed=5, scale=0.01)
    other_vhack = root / "vhack_other"
    ok("extract-vhack", "--pool", root / "pool", "-m", other, "--adapter", "lora",
       "--rank", 4, "--alpha", 8, "--out", other_vhack)  # fmt: skip
    out = root / "refused"
    grpo = ("train-grpo", *SMALL, "--reward", "mc", "--max-steps", 1, "--out", out)
    cases = [
        (("--vhack", other_vhack), ["--vhack", "extracted on model", "tiny-random"]),
        (("--vhack", vhacks["lora"], "--adapter-kind", "svd"), ["--vhack", "kind", "svd"]),
        (("--vhack", vhacks["lora"], "--lora-r", 8), ["--vhack", "rank 4", "--lora-r"]),
        (("--generator", "tiny-random:0.3"), ["--generator", "0.3 x --num-generations 4"]),
        (("--generator", "tiny-random:0.75", "--generator", f"{other}:0.25"), ["leave the policy"]),
        (("--generator", "tiny-random"), ["--generator", "MODEL[:ADAPTER"]),
        (("--reward", "unit-tests", "--problem-ids", "no_such_problem"), ["no_such_problem"]),
        (("--reward", "unit-tests", "--data", root / "missing.yaml"), ["missing.yaml"]),
        (("--dpo-pairs", root / "nope.jsonl", "--dpo-weight", 1), ["--dpo-pairs", "nope.jsonl"]),
        (("--dpo-pairs", pairs), ["--dpo-pairs and --dpo-weight"]),
    ]
    for extra, expected in cases:
        one_error_line(invoke(*grpo, *extra), *expected)
        assert not out.exists()
