import pytest
import torch
import torch.nn.functional as F

from phiforge.model.fused import linear_cross_entropy


def reference(h, w, b, y):
    logits = (h @ w.t() + b).float()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_linear_cross_entropy_matches_reference_fp32(chunk):
    torch.manual_seed(0)
    h = torch.randn(3, 41, 32, requires_grad=True)
    w = (torch.randn(300, 32) * 0.2).requires_grad_()
    b = (torch.randn(300) * 0.1).requires_grad_()
    y = torch.randint(0, 300, (3, 41))
    y[0, :5] = -100  # ignored positions take no part in loss or gradient
    ref = reference(h, w, b, y)
    ref.backward()
    grads = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    out = linear_cross_entropy(h, w, b, y, chunk_rows=chunk)
    (out * 2.0).backward()  # a non-unit upstream gradient must scale every gradient
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip((h.grad, w.grad, b.grad), grads):
        torch.testing.assert_close(got, 2.0 * want, rtol=1e-5, atol=1e-6)
    assert h.grad[0, :5].abs().max() == 0


def test_linear_cross_entropy_bf16_autocast_close_to_reference():
    torch.manual_seed(0)
    h = torch.randn(64, 48, requires_grad=True)
    w = (torch.randn(500, 48) * 0.2).requires_grad_()
    b = torch.zeros(500, requires_grad=True)
    y = torch.randint(0, 500, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(h, w, b, y, chunk_rows=16)
        ref = reference(h, w, b, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)  # bf16 tolerance
    out.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0


def test_model_loss_uses_fused_path_and_matches_logits():
    from phiforge.model import Phi2, Phi2Config

    torch.manual_seed(0)
    m = Phi2(Phi2Config.from_preset("tiny"))
    m.loss_chunk_rows = 16
    x = torch.randint(0, 4096, (2, 30))
    y = torch.randint(0, 4096, (2, 30))
    loss = m(x, y).loss
    loss.backward()
    g_fused = m.lm_head.weight.grad.clone()
    m.zero_grad()
    m.loss_chunk_rows = 0
    logits = m(x)
    ref = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fused, m.lm_head.weight.grad, rtol=1e-4, atol=1e-7)
