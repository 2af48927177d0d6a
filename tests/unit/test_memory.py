"""The memory-saving RMSNorm and SwiGLU give the stock layers' values and gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefalign.memory import RMSNormFunction, SiluMulFunction, use_memory_efficient_layers
from prefalign.testing import tiny_causal_lm, tiny_tokenizer


def test_rmsnorm_function_passes_gradcheck_and_matches_the_formula():
    """x = (3, 4): mean(x^2) = 12.5, rms = 3.5355339; with w = (1, 2): y = (0.8485281, 2.2627417)."""
    x = torch.tensor([[3.0, 4.0]])
    y = RMSNormFunction.apply(x, torch.tensor([1.0, 2.0]), 0.0)
    torch.testing.assert_close(y, torch.tensor([[3 / 12.5**0.5, 8 / 12.5**0.5]]))
    xd = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (xd, wd))


def test_silu_mul_function_passes_gradcheck():
    gate = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluMulFunction.apply, (gate, up))
    torch.testing.assert_close(SiluMulFunction.apply(gate, up), F.silu(gate) * up)


def test_patched_model_matches_stock_model_values_and_gradients():
    tok = tiny_tokenizer()
    stock = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=3).train()
    fast = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=3).train()
    assert use_memory_efficient_layers(fast) == 2 * 2 + 1 + 2  # 2 norms + 1 MLP per layer, final norm
    ids = torch.randint(3, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    for model in (stock, fast):
        model(ids, labels=ids).loss.backward()
    torch.testing.assert_close(fast(ids).logits, stock(ids).logits)
    for (name, a), b in zip(fast.named_parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
