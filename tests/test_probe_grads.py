"""Per-sample gradients, cosines and the projection, checked against independent references.

Run: python -m pytest tests/test_probe_grads.py -q

- the batched (vectorised) path against a loop of one backward pass per unpadded sample, for
  both adapters, to 1e-4 on raw gradients and cosines, on prompts of different lengths;
- the projection and both cosines against a 2-module case computed by hand;
- only adapter tensors train: base weights stay bit-identical through a replay step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_probe_pool import write_pool

from persona_cli.models import load_model, load_tokenizer, resolve
from persona_cli.probe.adapters import DiagScale, ProbeAdapter, build_adapter
from persona_cli.probe.config import AdapterConfig, ReplayConfig
from persona_cli.probe.encoding import encode
from persona_cli.probe.geometry import cosines, module_cosines, project
from persona_cli.probe.grads import batch_gradient, per_sample_grads
from persona_cli.probe.pool import read_pool
from persona_cli.probe.replay import replay_step


@pytest.fixture(scope="module")
def tiny(prepared_home: Path) -> Any:
    return resolve("tiny-random")


@pytest.fixture(scope="module")
def pool(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[Any]]:
    directory = tmp_path_factory.mktemp("pool")
    return read_pool(write_pool(directory, load_tokenizer(tiny)))


def _adapter(tiny: Any, kind: str) -> ProbeAdapter:
    adapter = build_adapter(
        load_model(tiny, dtype="float32", device="cpu"), AdapterConfig(kind=kind, rank=4)
    )
    # Move off the init so every tensor has a gradient (LoRA B = 0 would zero A's gradient,
    # and the SVD delta = 0 is a special point); seeded so a failure reproduces.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return adapter


@pytest.mark.parametrize("kind", ["lora", "svd"])
def test_batched_per_sample_gradients_equal_the_loop(tiny: Any, pool: dict, kind: str) -> None:
    tok = load_tokenizer(tiny)
    adapter = _adapter(tiny, kind)
    rows = [r for r in pool[0] if r.completion][1:5]  # wrong, hack_right, hack_stub, right
    # Prompts cut to different lengths (the tail keeps the chat markup), so the batch is
    # padded differently per sample; short prompts also keep the loop path cheap.
    samples = [
        encode(tok, r.prompt[-(60 + 40 * i) :], r.completion, max_length=512)
        for i, r in enumerate(rows)
    ]
    assert len({len(s.input_ids) for s in samples}) == 4

    batched = per_sample_grads(adapter, samples, tok.pad_token_id, method="batched", batch_size=4)
    loop = per_sample_grads(adapter, samples, tok.pad_token_id, method="loop")

    assert batched.grads.shape == (4, adapter.size)
    assert loop.grads.abs().max() > 1e-3  # not a trivially zero comparison
    torch.testing.assert_close(batched.grads, loop.grads, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched.nll, loop.nll, rtol=1e-5, atol=1e-5)

    v = torch.randn(adapter.size, generator=torch.Generator().manual_seed(1))
    for got, want in zip(
        cosines(batched.grads, v, adapter), cosines(loop.grads, v, adapter), strict=True
    ):
        assert (got - want).abs().max() < 1e-4
    per_module_b = module_cosines(batched.grads, v, adapter).cos
    per_module_l = module_cosines(loop.grads, v, adapter).cos
    assert (per_module_b - per_module_l).abs().max() < 1e-4
    # Independent cross-check: a plain backward of the summed loss is the sum of the rows.
    torch.testing.assert_close(
        batch_gradient(adapter, samples, tok.pad_token_id), loop.grads.sum(0), rtol=1e-4, atol=1e-4
    )


def _two_module_adapter() -> ProbeAdapter:
    entries = [
        ("m1", "delta", DiagScale(2, torch.float32, torch.device("cpu"))),
        ("m2", "delta", DiagScale(3, torch.float32, torch.device("cpu"))),
    ]
    return ProbeAdapter(torch.nn.Module(), AdapterConfig(kind="svd"), entries)


def test_projection_and_cosines_match_a_hand_computed_two_module_case() -> None:
    adapter = _two_module_adapter()
    g = torch.tensor([[1.0, 0.0, 1.0, 2.0, 0.0]])  # g1 = (1, 0), g2 = (1, 2, 0)
    v = torch.tensor([1.0, 1.0, 0.0, -1.0, 0.0])  # v1 = (1, 1), v2 = (0, -1, 0)
    # g.v = 1 - 2 = -1; |g| = sqrt(6), |v| = sqrt(3); |g1||v1| = sqrt(2), |g2||v2| = sqrt(5).
    cos, cos_w = cosines(g, v, adapter)
    assert cos.item() == pytest.approx(-1 / math.sqrt(18))
    assert cos_w.item() == pytest.approx(-1 / (math.sqrt(2) + math.sqrt(5)))

    positive = project(g, v, adapter, when="positive")
    # m1: cos = 1/sqrt(2) > 0, fires: g1 - (1/2) v1 = (0.5, -0.5). m2: cos < 0, untouched.
    assert positive.fired.tolist() == [[True, False]]
    torch.testing.assert_close(positive.grads, torch.tensor([[0.5, -0.5, 1.0, 2.0, 0.0]]))
    assert positive.cos_in[0].tolist() == pytest.approx([1 / math.sqrt(2), -2 / math.sqrt(5)])
    assert positive.cos_out[0].tolist() == pytest.approx([0.0, -2 / math.sqrt(5)], abs=1e-12)

    always = project(g, v, adapter, when="always")
    # m2 too: g2 - (-2 / 1) v2 = (1, 2, 0) + 2 (0, -1, 0) = (1, 0, 0).
    assert always.fired.tolist() == [[True, True]]
    torch.testing.assert_close(always.grads, torch.tensor([[0.5, -0.5, 1.0, 0.0, 0.0]]))
    assert always.cos_out[0].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)

    never = project(g, v, adapter, when=None)
    assert not never.fired.any() and torch.equal(never.grads, g)
    assert torch.equal(never.cos_out, never.cos_in)

    zero = project(torch.zeros(1, 5), v, adapter, when="always")  # undefined cosine never fires
    assert torch.isnan(zero.cos_in).all() and not zero.fired.any()


@pytest.mark.parametrize("kind", ["lora", "svd"])
def test_only_the_adapter_trains(tiny: Any, pool: dict, kind: str) -> None:
    tok = load_tokenizer(tiny)
    adapter = build_adapter(
        load_model(tiny, dtype="float32", device="cpu"), AdapterConfig(kind=kind, rank=4)
    )
    trainable = {id(p) for p in adapter.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter.parameters()}
    base_before = {
        n: p.detach().clone() for n, p in adapter.model.named_parameters() if not p.requires_grad
    }
    adapter_before = adapter.flat()
    v = torch.randn(adapter.size, generator=torch.Generator().manual_seed(2))
    rows, update = replay_step(adapter, v, tok, pool[0], ReplayConfig(lr=1e-2))
    assert update is not None and len(rows) == len(pool[0])
    opt = torch.optim.SGD(adapter.parameters(), lr=1e-2)
    for p, g in zip(adapter.parameters(), adapter.split(update).values(), strict=True):
        p.grad = g
    opt.step()
    assert not torch.equal(adapter.flat(), adapter_before)
    for n, p in adapter.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n
