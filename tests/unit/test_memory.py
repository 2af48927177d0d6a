"""The memory-saving RMSNorm and SwiGLU give the stock layers' values and gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefalign.memory import (
    RMSNormFunction,
    SiluMulFunction,
    SwiGLUDownFunction,
    lean_layers,
)
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


def test_swiglu_down_function_passes_gradcheck_and_keeps_only_gate_and_up():
    gate = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUDownFunction.apply, (gate, up, weight))
    torch.testing.assert_close(SwiGLUDownFunction.apply(gate, up, weight), (F.silu(gate) * up) @ weight.t())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        SwiGLUDownFunction.apply(gate, up, weight)
    assert [t.shape for t in saved] == [gate.shape, up.shape, weight.shape]  # no copy of silu(gate) * up
    frozen = weight.detach()
    out = SwiGLUDownFunction.apply(gate, up, frozen)
    out.sum().backward()  # a frozen projection (LoRA base weights) gets no gradient computed
    assert frozen.grad is None and gate.grad is not None


def test_patched_model_matches_stock_model_values_and_gradients():
    tok = tiny_tokenizer()
    stock = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=3).train()
    fast = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=3).train()
    ids = torch.randint(3, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    with lean_layers(fast) as lean:
        assert (
            lean.patched == 2 * (2 + 1 + 7) + 1 + 1
        )  # per layer: 2 norms, MLP, 7 projections; final norm; embedding
        assert "forward" in fast.model.norm.__dict__
        for model in (stock, fast):
            model(ids, labels=ids).loss.backward()
        torch.testing.assert_close(fast(ids).logits, stock(ids).logits)
    for (name, a), b in zip(fast.named_parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_lean_layers_are_undone_on_exit_even_after_an_error():
    """Leaving the block (here by an exception) restores every stock forward, including a forward the
    caller had set on a module itself, and removes the in-place mark from the parameters."""
    from prefalign.memory import GRAD_IN_PLACE

    model = tiny_causal_lm(tokenizer=tiny_tokenizer(), hidden_size=64, seed=3)
    own = model.model.layers[0].mlp.forward
    model.model.layers[0].mlp.forward = own  # an instance forward of the caller's, kept
    params = list(model.parameters())
    try:
        with lean_layers(model, params) as lean:
            assert lean.patched > 0 and all(getattr(p, GRAD_IN_PLACE) for p in params)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert model.model.layers[0].mlp.__dict__["forward"] == own
    for name, module in model.named_modules():
        if name != "model.layers.0.mlp":
            assert "forward" not in module.__dict__, name
    assert not any(hasattr(p, GRAD_IN_PLACE) for p in params)


def test_head_token_logps_matches_log_softmax_in_values_and_gradients():
    """Chunks of 3 over 7 rows (the last chunk partial): equal to the full log-softmax's picked entries."""
    from prefalign.memory import HeadTokenLogps

    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=torch.Generator().manual_seed(0))
    got = HeadTokenLogps.apply(hidden, weight, targets, 3)
    want = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    g = torch.randn(7, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, (hidden, weight), g.float())
    want_grads = torch.autograd.grad(want, (hidden, weight), g)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_head_token_logps_with_known_normalisers_equals_the_full_pass():
    """Given each row's log-normaliser (NaN: unknown, computed), the forward computes only the target
    logits: the same values and gradients as the pass over the vocabulary, and it never projects onto the
    vocabulary for rows whose normaliser is given."""
    from prefalign import memory
    from prefalign.memory import HeadTokenLogps, head_logps

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(13, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, 13, (9,), generator=gen)
    _, lse, _ = head_logps(hidden, weight, targets, 4)
    known = lse.clone()
    known[[2, 7]] = float("nan")
    seen = []
    real = memory.head_logps
    memory.head_logps = lambda h, *a, **k: seen.append(h.shape[0]) or real(h, *a, **k)
    try:
        got = HeadTokenLogps.apply(hidden, weight, targets, 4, known)
    finally:
        memory.head_logps = real
    assert seen == [2]  # only the two unknown rows went over the vocabulary
    want = HeadTokenLogps.apply(hidden, weight, targets, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g = torch.randn(9, dtype=torch.float64, generator=gen)
    got_grads = torch.autograd.grad(got, (hidden, weight), g)
    want_grads = torch.autograd.grad(want, (hidden, weight), g)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_packed_logps_through_the_chunked_head_equals_the_model_logits_path():
    """prefalign.packing.packed_logps projects hidden states itself on Llama-type models; the values and
    gradients equal those computed from the model's own logits."""
    from prefalign.data import encode_preferences
    from prefalign.memory import plain_lm_head
    from prefalign.packing import pack_pairs, packed_logps
    from prefalign.testing import synthetic_pairs

    tok = tiny_tokenizer()
    pairs = encode_preferences(tok, synthetic_pairs(3, seed=1), 64)
    fast = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=5)
    stock = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=5)
    assert plain_lm_head(fast) is fast.lm_head
    stock.config.model_type = "unknown"  # falls back to the model's logits
    assert plain_lm_head(stock) is None
    a, b = packed_logps(fast, pack_pairs(pairs)), packed_logps(stock, pack_pairs(pairs))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(fast.named_parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert fast.lm_head.forward(torch.ones(1, 64)).shape[-1] == len(tok)  # the head is restored


def test_head_token_logps_adds_into_grad_in_place_when_asked():
    """Under accumulate_in_place the weight gradient goes straight into ``.grad`` (nothing returned),
    adding to what is there, and equals the gradient autograd would have returned."""
    from prefalign.memory import HeadTokenLogps, accumulate_in_place

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 5, generator=gen, requires_grad=True)
    targets = torch.randint(0, 13, (6,), generator=gen)
    plain = torch.randn(13, 5, generator=gen).requires_grad_()
    direct = plain.detach().clone().requires_grad_()
    accumulate_in_place([direct])
    direct.grad = torch.full_like(direct, 0.5)
    g = torch.randn(6, generator=gen)
    HeadTokenLogps.apply(hidden, plain, targets, 4).backward(g)
    HeadTokenLogps.apply(hidden, direct, targets, 4).backward(g)
    torch.testing.assert_close(direct.grad, plain.grad + 0.5)


def test_head_logps_entropy_matches_categorical():
    """Entropy from the running log-sum-exp over vocabulary slices equals torch's Categorical entropy."""
    from prefalign.memory import head_logps

    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(9, 8, generator=gen) * 3, torch.randn(50, 8, generator=gen)
    targets = torch.randint(0, 50, (9,), generator=gen)
    logp, lse, ent = head_logps(hidden, weight, targets, 16, entropy=True)
    logits = hidden @ weight.t()
    torch.testing.assert_close(ent, torch.distributions.Categorical(logits=logits).entropy())
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1))


def test_embedding_function_gradients_match_nn_embedding():
    """Repeated ids add up, the padding row gets nothing; in place or returned, the same gradient."""
    from prefalign.memory import EmbeddingFunction, accumulate_in_place

    ids = torch.tensor([[1, 4, 4, 0], [2, 0, 4, 3]])
    stock = torch.nn.Embedding(6, 3, padding_idx=0)
    g = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(3))
    stock(ids).backward(g)
    returned = stock.weight.detach().clone().requires_grad_()
    out = EmbeddingFunction.apply(ids, returned, 0)
    torch.testing.assert_close(out, stock(ids))
    out.backward(g)
    torch.testing.assert_close(returned.grad, stock.weight.grad)
    direct = stock.weight.detach().clone().requires_grad_()
    accumulate_in_place([direct])
    direct.grad = torch.ones_like(direct)
    EmbeddingFunction.apply(ids, direct, 0).backward(g)
    torch.testing.assert_close(direct.grad, stock.weight.grad + 1)


def test_tied_weights_accumulate_in_place_equal_autograd():
    """A whole tiny model (tied embedding and head): one training backward with gradients added in place
    equals the stock model's gradients."""
    from prefalign.data import encode_preferences
    from prefalign.packing import pack_pairs, packed_logps
    from prefalign.testing import synthetic_pairs

    tok = tiny_tokenizer()
    pairs = encode_preferences(tok, synthetic_pairs(3, seed=4), 64)
    fast = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=6)
    stock = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=6)
    assert fast.lm_head.weight is fast.model.embed_tokens.weight
    params = list(fast.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    with lean_layers(fast, params):
        for _ in range(2):  # two micro-batches: the second adds to the first
            packed_logps(fast, pack_pairs(pairs)).sum().backward()
            packed_logps(stock, pack_pairs(pairs)).sum().backward()
    for (name, p), q in zip(fast.named_parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_linear_function_passes_gradcheck_and_adds_into_grad_in_place():
    from prefalign.memory import LinearFunction, accumulate_in_place

    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(LinearFunction.apply, (x, w))
    g = torch.randn(2, 3, 4, dtype=torch.float64)
    want = torch.autograd.grad(F.linear(x, w), w, g)[0]
    direct = w.detach().clone().requires_grad_()
    accumulate_in_place([direct])
    direct.grad = torch.ones_like(direct)
    LinearFunction.apply(x, direct).backward(g)
    torch.testing.assert_close(direct.grad, want + 1)


def test_release_every_hooks_every_kth_decoder_layer_while_gradients_are_recorded(monkeypatch):
    """With ``release_every=2`` on a 5-layer model, layers 0, 2 and 4 hand freed memory back after their
    forward when gradients are recorded (not under ``no_grad``); the hooks are gone on exit."""
    import prefalign.memory as memory

    calls: list[int] = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1) or True)
    model = tiny_causal_lm(tokenizer=tiny_tokenizer(), hidden_size=32, num_layers=5, seed=0)
    ids = torch.tensor([[3, 4, 5, 6]])
    with lean_layers(model, release_every=2):
        with torch.no_grad():
            model(ids)
        assert calls == []
        model(ids).logits.sum().backward()
        assert len(calls) == 3
    assert all(not layer._forward_hooks for layer in model.model.layers)
    model(ids)
    assert len(calls) == 3
