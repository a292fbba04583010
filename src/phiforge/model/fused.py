"""Fused ops, each checked against its plain reference in tests/test_fused.py.

`linear_cross_entropy`: the lm_head projection and the cross-entropy loss in row chunks. The full
[tokens, vocab] fp32 logits (1 GiB at 8x2048 tokens and a 51200 vocab... per fp32 copy) are never held:
each chunk's gradients with respect to the hidden states, weight and bias are computed in the forward pass
and only scaled in the backward pass (the approach of Liger-Kernel's fused linear cross-entropy).
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_rows: int, ignore_index: int):
        n = h.size(0)
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1).to(torch.float32)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if needs_grad and bias is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, chunk_rows):
            hc, yc, vc = h[start : start + chunk_rows], targets[start : start + chunk_rows], valid[start : start + chunk_rows]
            logits = hc @ weight.t()
            if bias is not None:
                logits = logits + bias
            logits = logits.float()
            lse = torch.logsumexp(logits, dim=-1)
            y_safe = torch.where(vc, yc, torch.zeros_like(yc))
            target_logit = logits.gather(1, y_safe[:, None]).squeeze(1)
            loss += ((lse - target_logit) * vc).sum()
            if needs_grad:
                # d loss / d logits = (softmax - onehot) / n_valid on valid rows, 0 elsewhere
                g = torch.exp(logits - lse[:, None])
                g.scatter_add_(1, y_safe[:, None], -torch.ones_like(target_logit)[:, None])
                g *= (vc.to(g.dtype) / n_valid)[:, None]
                grad_h[start : start + chunk_rows] = (g.to(h.dtype) @ weight).to(h.dtype)
                grad_w += g.t() @ hc.float()
                if grad_b is not None:
                    grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.param_dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.param_dtypes
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_out).to(w_dtype) if ctx.needs_input_grad[1] else None
        gb = (grad_b * grad_out).to(b_dtype) if grad_b is not None and ctx.needs_input_grad[2] else None
        return gh, gw, gb, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         chunk_rows: int = 1024, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T + bias` against targets, ignoring `ignore_index`. h: [..., d]."""
    h2 = h.reshape(-1, h.size(-1))
    if torch.is_autocast_enabled(h.device.type):  # match the dtype autocast would give the lm_head matmul
        dt = torch.get_autocast_dtype(h.device.type)
        h2, weight = h2.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h2, weight, bias, targets.reshape(-1), chunk_rows, ignore_index)


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over rows of `logits` [N, V]; the backward writes softmax - onehot into the logits'
    own memory (they are dead by then: the lm_head's backward needs its input and weight, not its output).
    Two passes over the [N, V] logits each way instead of F.cross_entropy's log_softmax + nll, which write a
    second [N, V] tensor forward and two more backward (a zero-filled one-hot gradient, then the softmax one)."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int):
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        lse = torch.logsumexp(logits, dim=-1)
        target_logit = logits.gather(1, safe[:, None]).squeeze(1)
        n_valid = valid.sum().to(logits.dtype)  # 0 valid rows: nan, like F.cross_entropy
        ctx.save_for_backward(logits, lse, safe, valid, n_valid)
        return ((lse - target_logit) * valid).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, safe, valid, n_valid = ctx.saved_tensors
        g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
        g.scatter_add_(1, safe[:, None], -torch.ones_like(lse)[:, None])
        g.mul_((valid.to(g.dtype) * (grad_out / n_valid))[:, None])
        return g, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """F.cross_entropy(logits, targets, ignore_index=...) (mean) for 2-d logits, with less memory traffic.

    Its backward overwrites `logits` with their gradient: pass a tensor nothing else reads afterwards (the
    lm_head output or its .float() copy). Checked against F.cross_entropy in tests/test_fused.py."""
    if not logits.requires_grad:
        return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index)
    return _CrossEntropy.apply(logits, targets, ignore_index)
