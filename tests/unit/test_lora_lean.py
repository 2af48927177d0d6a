"""LoRA through the lean paths: the training swap (:class:`LoRALinearFunction`, the SwiGLU down projection
with its adapter) gives peft's values and gradients, and the decode steps (:class:`DecodeWeights`: the
adapter folded into prepacked weights) give the adapted model's logits, or the base's with it off."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from prefalign.decoding import DecodeProduct, DecodeWeights, HFStepper, LeanStepper, linear_parts
from prefalign.memory import LoRALinearFunction, SwiGLUDownFunction, lean_layers
from prefalign.models import adapter_disabled
from prefalign.testing import perturb_adapters, tiny_causal_lm


def lora_model(tokenizer, dropout: float = 0.0, seed: int = 0):
    base = tiny_causal_lm(tokenizer=tokenizer, hidden_size=64, seed=seed)
    torch.manual_seed(seed)  # peft draws A from the global generator
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    model = get_peft_model(base, config)
    perturb_adapters(model, seed=seed)
    return model


def test_lora_linear_function_passes_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: LoRALinearFunction.apply(t[0], t[0], *t[1:], 0.7), (x, w, bias, a, b)
    )
    x_d = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)  # a dropped-out copy
    assert torch.autograd.gradcheck(lambda *t: LoRALinearFunction.apply(*t, 0.7), (x, x_d, w, bias, a, b))
    ref = torch.nn.functional.linear(x, w, bias) + 0.7 * (x_d @ a.t()) @ b.t()
    torch.testing.assert_close(LoRALinearFunction.apply(x, x_d, w, bias, a, b, 0.7), ref)


def test_swiglu_down_with_an_adapter_passes_gradcheck():
    gen = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(3, 6, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    w = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    f = lambda *t: SwiGLUDownFunction.apply(*t, 1.5)  # noqa: E731
    assert torch.autograd.gradcheck(f, (gate, up, w, a, b))
    h = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(f(gate, up, w, a, b), h @ w.t() + 1.5 * (h @ a.t()) @ b.t())


def _loss_and_grads(model, ids, weights):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lean_lora_layers_give_peft_values_and_gradients(tokenizer, dropout):
    """Train mode, adapters perturbed: logits and the gradient of every trainable parameter (the adapters
    only) agree with peft's own forward; with dropout the same masks are drawn (same seed, same order)."""
    model = lora_model(tokenizer, dropout=dropout).train()
    ids = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(2))
    weights = torch.randn(2, 9, len(tokenizer), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    stock, stock_grads = _loss_and_grads(model, ids, weights)
    with lean_layers(model) as lean:
        swapped = [m for m in model.modules() if "forward" in m.__dict__]
        assert any(type(m).__module__.startswith("peft.tuners.lora") for m in swapped)
        assert lean.patched > 0
        torch.manual_seed(5)
        mine, grads = _loss_and_grads(model, ids, weights)
    assert set(grads) == set(stock_grads) and all("lora_" in n for n in grads)
    torch.testing.assert_close(mine, stock, atol=1e-5, rtol=1e-5)
    for name, g in stock_grads.items():  # float32 sums in another order: 1e-5 of the gradient's scale
        scale = float(g.abs().max())
        torch.testing.assert_close(grads[name], g, atol=1e-5 * scale, rtol=1e-4, msg=name)
    assert not any("forward" in m.__dict__ for m in model.modules())  # undone on exit


def test_lean_lora_layers_with_the_adapter_off_give_the_base_model(tokenizer):
    model = lora_model(tokenizer).eval()
    base = tiny_causal_lm(tokenizer=tokenizer, hidden_size=64, seed=0).eval()
    ids = torch.randint(0, len(tokenizer), (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), lean_layers(model), adapter_disabled(model):
        off = model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(off, base(input_ids=ids).logits, atol=1e-6, rtol=0)
        assert not torch.allclose(model(input_ids=ids).logits, off, atol=1e-3)  # the adapter matters


def test_decode_product_equals_linear():
    gen = torch.Generator().manual_seed(0)
    w, bias = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
    x = torch.randn(8, 1, 24, generator=gen)
    for b in (None, bias):
        product = DecodeProduct(w, b, rows=8)
        torch.testing.assert_close(product(x), torch.nn.functional.linear(x, w, b), atol=1e-6, rtol=1e-6)
    packed = DecodeProduct(w, None, rows=8)
    if packed.packed is not None:  # (the row check belongs to the MKL path, which every CPU build here has)
        with pytest.raises(ValueError, match="packed for 8 rows"):
            packed(x[:3])


def test_linear_parts_fold_the_active_adapter_and_drop_it_when_disabled(tokenizer):
    model = lora_model(tokenizer).eval()
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6))
    parts = linear_parts(q)
    assert len(parts.low_rank) == 1
    effective = parts.into(torch.empty_like(parts.weight))
    with torch.no_grad():
        torch.testing.assert_close(x @ effective.t(), q(x), atol=1e-5, rtol=1e-5)
        with adapter_disabled(model):
            off = linear_parts(q)
            assert off.low_rank == [] and off.weight is q.base_layer.weight


@pytest.mark.parametrize("groups", [None, [2, 2]])
def test_lean_decode_of_a_lora_model_equals_its_forward(tokenizer, groups):
    """The decode steps run the adapter folded into packed weights; every step's logits agree with the
    peft model's own forward (and, adapter off, with the base model's)."""
    model = lora_model(tokenizer).eval()
    prompt = [5, 9, 3, 7]
    rows = 4
    for off in (False, True):
        ctx = adapter_disabled(model) if off else torch.no_grad()
        with torch.no_grad(), ctx:
            base = model.get_base_model()
            if groups is None:
                key_mask = torch.ones(rows, len(prompt) + 5, dtype=torch.bool)
                lean = LeanStepper(base, key_mask)
                first = lean.step(torch.tensor([prompt] * rows), torch.arange(len(prompt)).expand(rows, -1))
            else:
                key_mask = torch.ones(len(groups), len(prompt) + 5, dtype=torch.bool)
                lean = LeanStepper(base, key_mask, groups)
                first = lean.step(
                    torch.tensor([prompt] * len(groups)), torch.arange(len(prompt)).expand(len(groups), -1)
                )
                first = first.repeat_interleave(torch.tensor(groups), 0)
            hf = HFStepper(model, torch.ones(rows, len(prompt) + 5, dtype=torch.long))
            expected = hf.step(torch.tensor([prompt] * rows), torch.arange(len(prompt)).expand(rows, -1))
            torch.testing.assert_close(first, expected, atol=1e-4, rtol=0)
            gen = torch.Generator().manual_seed(7)
            for t in range(5):
                token = torch.randint(0, len(tokenizer), (rows, 1), generator=gen)
                position = torch.full((rows, 1), len(prompt) + t)
                a, b = lean.step(token, position), hf.step(token, position)
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
            assert isinstance(lean.fast, DecodeWeights)  # the decode steps took the fast path


def test_decode_weights_fall_back_for_a_dora_adapter(tokenizer):
    base = tiny_causal_lm(tokenizer=tokenizer, hidden_size=64, seed=0)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    ).eval()
    assert linear_parts(model.get_base_model().model.layers[0].self_attn.q_proj) is None
    assert DecodeWeights.build(model.get_base_model(), rows=2) is None


def test_decode_weights_are_not_built_for_models_over_the_copy_limit(tokenizer, monkeypatch):
    import prefalign.decoding as decoding

    model = tiny_causal_lm(tokenizer=tokenizer, hidden_size=64, seed=0)
    assert DecodeWeights.build(model, rows=2) is not None
    monkeypatch.setattr(decoding, "DECODE_COPY_LIMIT", 1000)
    assert DecodeWeights.build(model, rows=2) is None
    lean = LeanStepper(model.eval(), torch.ones(2, 6, dtype=torch.bool))
    with torch.no_grad():
        lean.step(torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.arange(3).expand(2, -1))
        lean.step(torch.tensor([[3], [4]]), torch.tensor([[3], [3]]))
    assert lean.fast is None and not lean.fast_decode  # decoded through the modules
