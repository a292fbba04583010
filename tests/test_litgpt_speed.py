"""The CPU speed fixes the LitGPT study led to: the in-place cross-entropy (model/fused.py) equals
F.cross_entropy, also inside the model, under autocast and under torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phiforge.model import Phi2, Phi2Config
from phiforge.model.fused import cross_entropy


@pytest.mark.parametrize("ignored", [0, 5])
def test_cross_entropy_matches_torch(ignored):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(48, 300, generator=g) * 3
    y = torch.randint(0, 300, (48,), generator=g)
    y[:ignored] = -100
    a = logits.clone().requires_grad_()
    ref = F.cross_entropy(a, y, ignore_index=-100)
    (ref * 1.7).backward()
    b = logits.clone().requires_grad_()
    out = cross_entropy(b * 1.0, y)  # b * 1.0: the function may overwrite its input, as the lm_head output
    (out * 1.7).backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-8)


def test_cross_entropy_all_ignored_is_nan_like_torch():
    logits = torch.randn(4, 10, requires_grad=True)
    y = torch.full((4,), -100)
    assert torch.isnan(F.cross_entropy(logits, y)) and torch.isnan(cross_entropy(logits * 1.0, y))


def _model_loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = model(x, y).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["fp32", "bf16-autocast", "compiled"])
def test_model_loss_and_grads_match_plain_cross_entropy(mode, monkeypatch):
    torch.manual_seed(0)
    model = Phi2(Phi2Config.from_preset("tiny", n_layer=2)).train()
    x = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(1))
    y = x.roll(-1, 1)
    y[0, :3] = -100

    def run():
        if mode == "bf16-autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _model_loss_and_grads(model, x, y)
        if mode == "compiled":
            compiled = torch.compile(model, backend="aot_eager")
            model.zero_grad(set_to_none=True)
            loss = compiled(x, y).loss
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
        return _model_loss_and_grads(model, x, y)

    got_loss, got = run()
    import phiforge.model.phi2 as phi2

    monkeypatch.setattr(phi2, "cross_entropy", lambda lg, t, ignore_index: F.cross_entropy(lg, t, ignore_index=ignore_index))
    ref_loss, ref = run()
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-6, atol=0)
    # bf16: the fp32 logit gradients agree to ~1e-9, but a few round to the neighbouring bf16 value when cast back
    rtol, atol = (1e-2, 1e-3) if mode == "bf16-autocast" else (1e-5, 1e-7)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=rtol, atol=atol, msg=k)
