"""`moe.position: parallel` (issue 15) under the training engine: FSDP2 on 2 ranks gives the losses of 1 rank,
exact resume after kill -9, and activation checkpointing and per-block compile change nothing. The same checks
for `after_mlp` are in tests/test_engine_parallel.py and tests/test_engine_resume.py; the model-level checks
(identity at init, fast path vs reference, upcycling) are in tests/test_moe.py. CPU, gloo."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import AC_VARIANTS, kill9_inside, losses, make_synthetic, max_rel_diff, metrics, run_train

pytestmark = pytest.mark.slow  # multi-process or end-to-end: left out of the quick subset (-m "not slow")

PARALLEL = "model.moe={num_experts: 4, top_k: 2, position: parallel"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("engine") / "synthetic")


def test_fsdp2_two_ranks_match_one_rank(data, tmp_path):
    """The balancing loss is off: a product of per-batch means, it depends on how the batch is split."""
    moe = [f"{PARALLEL}, aux_loss_coef: 0.0}}", "max_steps=10", "save_interval=0"]
    run_train(1, data, tmp_path / "one", "micro_batch_size=8", *moe)
    run_train(2, data, tmp_path / "two", "parallel.strategy=fsdp", *moe)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(b) == list(range(1, 11)) and max_rel_diff(a, b, range(1, 11)) < 1e-5
    events = [e for e in metrics(tmp_path / "two") if e["event"] == "moe"]
    assert events and set(events[-1]["layers"]) == {"0", "1"}  # MoE was on, in both blocks


def test_exact_resume_after_kill9(data, tmp_path):
    """Bit-identical after kill -9 at step 13 and --resume auto from step 10: experts, router, the dense MLP beside
    them, optimizer state and the balancing bias buffer."""
    moe = [f"{PARALLEL}, bias_balancing: true, bias_update_rate: 0.01}}", "max_steps=20", "save_interval=5"]
    run_train(1, data, tmp_path / "straight", *moe)
    run = tmp_path / "killed"
    kill9_inside(13, data, run, *moe)
    assert (run / "latest").read_text().strip() == "step-00000010"
    run_train(1, data, run, *moe, resume="auto")
    assert [e for e in metrics(run) if e["event"] == "start"][-1]["start_step"] == 10
    a, b = losses(tmp_path / "straight"), losses(run)
    assert [b[s] for s in range(11, 21)] == [a[s] for s in range(11, 21)]
    wa = load_file(tmp_path / "straight" / "checkpoints" / "step-00000020" / "model.safetensors")
    wb = load_file(run / "checkpoints" / "step-00000020" / "model.safetensors")
    assert "layers.0.moe.w2" in wa and not any("moe_layernorm" in k for k in wa)  # the parallel placement
    assert any(wa[k].abs().sum() > 0 for k in wa if k.endswith("expert_bias"))  # balancing moved the bias
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_activation_checkpointing_and_compile_change_nothing():
    """Full, every-2nd-block and op-level AC, and full AC + per-block compile (aot_eager): the plain model's loss
    and gradients, and its state-dict keys."""
    from phiforge.config import load_config
    from phiforge.model import Phi2
    from phiforge.train.config import TrainConfig
    from phiforge.train.parallelize import parallelize

    base = ["model.preset=tiny", "model.n_layer=4", "precision=fp32", "device=cpu", f"{PARALLEL}}}"]
    x = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    results = {}
    for name, sets in AC_VARIANTS.items():
        cfg = load_config(TrainConfig, None, base + sets)
        torch.manual_seed(0)
        model = Phi2(cfg.model_config()).train()
        with torch.no_grad():  # live experts (zero-init w2 would leave w1 and the router without gradient)
            for layer in model.moe_layers().values():
                layer.w2.normal_(0, 0.02)
        keys = list(model.state_dict())
        loss = parallelize(model, cfg)(x, x).loss
        loss.backward()
        assert list(model.state_dict()) == keys, name
        grads = {k.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): p.grad
                 for k, p in model.named_parameters()}
        results[name] = loss.detach(), grads
    ref_loss, ref_grads = results["none"]
    assert ref_grads["layers.0.moe.router"].abs().sum() > 0
    for name, (loss, grads) in results.items():
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        assert grads.keys() == ref_grads.keys(), name
        for k, g in ref_grads.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-7, msg=f"{name}: {k}")
