"""fused_logprob_entropy (torch path, single rank) against the fp64 oracle: values and gradients."""
import pytest
import torch

from or1_megatron.kernels import fused_logprob_entropy, naive_logprob_entropy, oracle_logprob_entropy
from or1_megatron.kernels.reference import max_abs_errors, oracle_errors, oracle_outputs


def _inputs(tokens, hidden_size, vocab, valid=None, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=gen).mul(scale).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=gen).mul(0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, valid or vocab, (tokens,), generator=gen)
    g_lp = torch.randn(tokens, generator=gen)
    g_ent = torch.randn(tokens, generator=gen)
    return hidden, weight, targets, g_lp, g_ent


def _run(fn, hidden, weight, targets, g_lp, g_ent, **kwargs):
    logprob, entropy = fn(hidden, weight, targets, **kwargs)
    grad_h, grad_w = torch.autograd.grad((g_lp * logprob + g_ent * entropy).sum(), (hidden, weight))
    return logprob, entropy, grad_h, grad_w


@pytest.mark.parametrize(
    "tokens, vocab, valid, temperature, chunk",
    [
        (37, 101, None, 1.0, 8),  # V not a multiple of the chunk, odd vocab
        (37, 101, 90, 0.7, 16),  # padded vocab (ids >= 90 excluded), temperature < 1
        (16, 64, 64, 1.6, 16),  # one chunk exactly, temperature > 1
        (5, 257, 200, 1.0, None),  # default chunk size (the whole vocabulary)
        (33, 128, 1, 1.0, 7),  # a single valid token: logprob 0, entropy 0
    ],
)
def test_fp32_matches_fp64_oracle(tokens, vocab, valid, temperature, chunk):
    hidden, weight, targets, g_lp, g_ent = _inputs(tokens, 24, vocab, valid)
    lp, ent, gh, gw = _run(
        fused_logprob_entropy, hidden, weight, targets, g_lp, g_ent,
        temperature=temperature, valid_vocab_size=valid, vocab_chunk=chunk, impl="torch",
    )
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == (tokens,)
    errors = oracle_errors(hidden, weight, targets, lp, ent, gh, gw, g_lp, g_ent, temperature, valid)
    assert max(errors.values()) < 2e-5, errors
    if valid is not None:
        assert torch.all(gw[valid:] == 0), "padded vocabulary rows must get exactly zero gradient"


def test_each_output_alone_has_the_right_gradient():
    hidden, weight, targets, _, _ = _inputs(19, 8, 50)
    for pick in (0, 1):
        out = fused_logprob_entropy(hidden, weight, targets, vocab_chunk=4)[pick]
        ref = oracle_logprob_entropy(hidden, weight, targets)[pick]
        got = torch.autograd.grad(out.sum(), (hidden, weight))
        want = torch.autograd.grad(ref.sum(), (hidden, weight))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.double(), w.double(), atol=2e-5, rtol=1e-5)


def test_extreme_logits_stay_in_range():
    # Large logits (|z| ~ 1e3) and a dominant target: no overflow, logprob <= 0, entropy >= 0.
    hidden, weight, targets, g_lp, g_ent = _inputs(12, 16, 300, scale=60.0, seed=3)
    lp, ent, gh, gw = _run(fused_logprob_entropy, hidden, weight, targets, g_lp, g_ent, vocab_chunk=5)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert (lp <= 0).all() and (ent >= 0).all()
    lp0, ent0 = oracle_logprob_entropy(hidden, weight, targets)
    torch.testing.assert_close(lp.double(), lp0, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent0, atol=1e-3, rtol=1e-4)


def test_bf16_accumulates_in_fp32():
    hidden, weight, targets, g_lp, g_ent = _inputs(21, 32, 77, dtype=torch.bfloat16)
    lp, ent, gh, gw = _run(fused_logprob_entropy, hidden, weight, targets, g_lp, g_ent, vocab_chunk=8)
    assert lp.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    # On CPU the matmul output is rounded to bf16 as in the naive path: compare with the oracle
    # at bf16 resolution of the logits, and with the naive bf16 path tightly.
    errors = oracle_errors(hidden, weight, targets, lp, ent, gh, gw, g_lp, g_ent)
    assert errors["logprob"] < 0.1 and errors["entropy"] < 0.05, errors
    assert errors["grad_hidden"] < 0.1 and errors["grad_weight"] < 0.1, errors
    lp_n, ent_n, gh_n, gw_n = _run(naive_logprob_entropy, hidden, weight, targets, g_lp, g_ent)
    torch.testing.assert_close(lp, lp_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_n, atol=1e-5, rtol=1e-5)


def test_naive_path_matches_oracle():
    hidden, weight, targets, g_lp, g_ent = _inputs(13, 8, 40, valid=33)
    lp, ent, gh, gw = _run(
        naive_logprob_entropy, hidden, weight, targets, g_lp, g_ent, temperature=0.8, valid_vocab_size=33
    )
    errors = oracle_errors(hidden, weight, targets, lp, ent, gh, gw, g_lp, g_ent, 0.8, 33)
    assert max(errors.values()) < 2e-5, errors


def test_no_weight_grad_when_frozen():
    hidden, weight, targets, _, _ = _inputs(9, 8, 30)
    weight = weight.detach()
    lp, ent = fused_logprob_entropy(hidden, weight, targets, vocab_chunk=4)
    (gh,) = torch.autograd.grad((lp + ent).sum(), (hidden,))
    lp0, ent0 = oracle_logprob_entropy(hidden, weight, targets)
    (gh0,) = torch.autograd.grad((lp0 + ent0).sum(), (hidden,))
    torch.testing.assert_close(gh.double(), gh0.double(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h, w, t: (h, w, t + 1000), "targets must be global token ids in \\[0, 30\\)"),
        (lambda h, w, t: (h, w, t - 100), "first at position 0"),
        (lambda h, w, t: (h[:, :4], w, t), "weight has hidden size 8 but hidden has 4"),
        (lambda h, w, t: (h, w, t[:3]), "targets has 3 entries but hidden has 9 tokens"),
        (lambda h, w, t: (h[:0], w, t[:0]), "no tokens"),
        (lambda h, w, t: (h, w.double(), t), "must share a floating dtype"),
        (lambda h, w, t: (h, w, t.float()), "targets must be int64 or int32"),
        (lambda h, w, t: (h[0], w, t), "hidden must be a 2-D"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    hidden, weight, targets, _, _ = _inputs(9, 8, 30)
    targets[0] = 0
    h, w, t = change(hidden.detach(), weight.detach(), targets)
    with pytest.raises(ValueError, match=message):
        fused_logprob_entropy(h, w, t)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"valid_vocab_size": 31}, "valid_vocab_size must be an int in \\[1, V_local \\* tp_size = 30\\]"),
        ({"valid_vocab_size": 5}, "targets must be global token ids in \\[0, 5\\)"),
        ({"vocab_chunk": 0}, "vocab_chunk must be a positive int"),
        ({"impl": "cuda"}, "impl must be one of"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, message):
    hidden, weight, targets, _, _ = _inputs(9, 8, 30)
    targets[:] = 7
    with pytest.raises(ValueError, match=message):
        fused_logprob_entropy(hidden, weight, targets, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_cuda_bf16_matches_oracle(impl):
    from or1_megatron.kernels import triton_available

    if impl == "triton" and not triton_available():
        pytest.skip("triton is not importable")
    gen = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab, valid = 1000, 256, 5000, 4900
    hidden = torch.randn(tokens, hidden_size, generator=gen).cuda().bfloat16().requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.05).cuda().bfloat16().requires_grad_()
    targets = torch.randint(0, valid, (tokens,), generator=gen).cuda()
    g_lp, g_ent = torch.randn(tokens, device="cuda"), torch.randn(tokens, device="cuda")
    lp, ent, gh, gw = _run(
        fused_logprob_entropy, hidden, weight, targets, g_lp, g_ent,
        temperature=0.9, valid_vocab_size=valid, vocab_chunk=300, impl=impl,
    )
    oracle = oracle_outputs(hidden, weight, targets, g_lp, g_ent, 0.9, valid)
    result = {"logprob": lp, "entropy": ent, "grad_hidden": gh, "grad_weight": gw}
    errors = max_abs_errors(result, oracle)
    # fp32 logits (torch.mm out_dtype) from exact bf16 inputs: values to fp32 accuracy; the
    # gradients are returned in bf16, so they are compared relative to their scale.
    assert errors["logprob"] < 1e-3 and errors["entropy"] < 1e-3, errors
    for key in ("grad_hidden", "grad_weight"):
        assert errors[key] < 2e-2 * oracle[key].abs().max().item(), (key, errors)


def test_triton_on_cpu_without_interpreter_is_refused_clearly():
    hidden, weight, targets, _, _ = _inputs(3, 4, 5)
    # ImportError without triton installed; ValueError with it (CPU tensors need TRITON_INTERPRET).
    with pytest.raises((ValueError, ImportError), match="impl='triton' needs"):
        fused_logprob_entropy(hidden, weight, targets, impl="triton")


def test_ambient_autocast_does_not_change_the_result():
    hidden, weight, targets, g_lp, g_ent = _inputs(11, 8, 40)
    want = _run(fused_logprob_entropy, hidden, weight, targets, g_lp, g_ent, vocab_chunk=4)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = _run(fused_logprob_entropy, hidden, weight, targets, g_lp, g_ent, vocab_chunk=4)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_chunking_does_not_change_the_result(dtype):
    # One column per chunk merges 77 partial softmax states per token; the whole vocabulary in
    # one chunk merges none. The chunk's target, padding and rescaling logic is all in between.
    hidden, weight, targets, g_lp, g_ent = _inputs(21, 32, 77, dtype=dtype, seed=5)
    want = _run(fused_logprob_entropy, hidden, weight, targets, g_lp, g_ent, vocab_chunk=77)
    for chunk in (1, 10, 76):
        got = _run(fused_logprob_entropy, hidden, weight, targets, g_lp, g_ent, vocab_chunk=chunk)
        for name, g, w in zip(("logprob", "entropy", "grad_hidden", "grad_weight"), got, want, strict=True):
            assert g.dtype == w.dtype, name
            # values: fp32 merges, rounding only; gradients: identical per column, and the
            # hidden gradient's fp32 sum over chunks rounds to the same bf16 value almost always
            tol = 1e-5 if dtype == torch.float32 or name in ("logprob", "entropy") else 1e-2
            torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol, msg=f"{name} chunk={chunk}")


def test_default_gpu_chunks_are_tensor_core_multiples():
    from or1_megatron.kernels.logprob import vocab_chunk_columns

    assert vocab_chunk_columns(8192, 152064, "cuda") == 4096  # 128 MiB of fp32 logits
    assert vocab_chunk_columns(16384, 19008, "cuda") == 2048  # 32B at TP8
    assert vocab_chunk_columns(10**6, 152064, "cuda") == 256  # never below one tile
    assert vocab_chunk_columns(8192, 1000, "cuda") == 1000  # never above the vocabulary
    assert vocab_chunk_columns(100, 50, "cpu", vocab_chunk=7) == 7
