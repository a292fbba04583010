"""Mixture of experts (issues 5 and 15): fast paths vs the reference loop, identity at init, the three
placements (after_mlp, parallel, replace_mlp), balancing, config, checkpoints, upcycling, HF / LitGPT export
refusal and the moe-report plot. All on CPU, each test a few seconds. The engine-level checks of the parallel
placement (FSDP2, exact resume, AC and compile) are in tests/test_moe_parallel.py."""

from __future__ import annotations

import json

import pytest
import torch

from phiforge.cli import main
from phiforge.config import load_config
from phiforge.errors import ConfigError
from phiforge.model import KVCache, MoE, MoEConfig, Phi2, Phi2Config
from phiforge.model.moe import POSITIONS, moe_metrics
from phiforge.model_files import load_checkpoint, resolve_checkpoint, save_checkpoint
from phiforge.train.metrics import matmul_params

from conftest import assert_one_line_error, run_cli

@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: on a busy 2-core machine a second intra-op thread makes them up to 30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(vocab_size=256, n_layer=2, n_embd=32, n_head=2, intermediate_size=64, max_seq_len=64)


# Every fast implementation is tested against the reference loop: grouped (torch._grouped_mm, the GPU path) runs
# in fp32 on the CPU with the torch we pin, so a torch that lost it fails these tests instead of skipping them.
FAST = ["padded", "grouped"]


def test_every_fast_implementation_is_tested():
    from phiforge.model.moe import IMPLS

    assert sorted(FAST) == sorted(set(IMPLS) - {"auto", "loop"})
    out = torch._grouped_mm(torch.ones(4, 8), torch.ones(2, 8, 4), offs=torch.tensor([2, 4], dtype=torch.int32))
    assert torch.equal(out, torch.full((4, 4), 8.0))


def _layer(seed=0, d=32, **kw) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(MoEConfig(**{"num_experts": 6, "top_k": 2, "expert_hidden": 24, **kw}), d)
    with torch.no_grad():  # non-zero outputs, so every parameter has a gradient to compare
        for name, p in layer.named_parameters():
            if name not in ("router", "w1", "shared_w1"):
                p.normal_(0, 0.1)
        if layer.cfg.bias_balancing:
            layer.expert_bias.normal_(0, 0.05)
    return layer


def _run(layer: MoE, impl: str, x: torch.Tensor):
    layer.impl = impl
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(layer.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, {k: v.clone() for k, v in layer.stats.items()}


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("kw", [
    {},
    {"capacity_factor": 0.75},  # drops some assignments
    {"router": "sigmoid", "shared_experts": 1, "bias_balancing": True},
    {"top_k": 1, "capacity_factor": 1.0},
], ids=["dropless", "capacity", "sigmoid-shared-bias", "top1-capacity"])
def test_fast_path_equals_reference_loop(impl, kw):
    layer = _layer(**kw)
    x = torch.randn(3, 40, 32)
    y_ref, gx_ref, g_ref, s_ref = _run(layer, "loop", x)
    y, gx, g, s = _run(layer, impl, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-5, msg=name)
    for name in s_ref:
        torch.testing.assert_close(s[name], s_ref[name])
    if kw.get("capacity_factor", 1.0) < 1.0:
        assert s["dropped"] > 0


@pytest.mark.parametrize("impl", FAST)
def test_bf16_bias_gradients_are_summed_in_fp32(impl):
    """An expert's bias gradient sums thousands of rows. In bf16 the fast path must match the reference loop in
    bf16 (whose broadcast-sum reduces in fp32); a gather's backward accumulating in bf16 was 2x off here."""
    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    _, _, g_ref, _ = _run(_layer(num_experts=4).to(torch.bfloat16), "loop", x)
    _, _, g, _ = _run(_layer(num_experts=4).to(torch.bfloat16), impl, x)
    for name in ("b1", "b2"):
        err = (g[name].float() - g_ref[name].float()).abs().max() / g_ref[name].float().abs().max()
        assert err < 1e-2, (name, err.item())


@pytest.mark.parametrize("impl", FAST)
def test_fast_path_with_unused_experts(impl):
    layer = _layer(num_experts=8, bias_balancing=True)
    with torch.no_grad():
        layer.expert_bias[:3] = -10.0  # experts 0-2 are never chosen: empty groups
    x = torch.randn(37, 32)  # group sizes that are not multiples of the grouped GEMM's alignment
    y_ref, gx_ref, g_ref, _ = _run(layer, "loop", x)
    y, gx, g, stats = _run(layer, impl, x)
    assert stats["load"][:3].sum() == 0
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_capacity_drops_exactly_the_overflow():
    layer = _layer(capacity_factor=0.5)
    y = layer(torch.randn(60, 32))
    C = layer.capacity(60)
    counts = layer.stats["load"] * 60 * 2
    assert int(layer.stats["dropped"]) == int((counts.round() - C).clamp(min=0).sum())
    assert y.shape == (60, 32)


@pytest.mark.parametrize("impl", ["loop"] + FAST)
def test_capacity_dropping_is_causal_and_only_in_training(impl):
    layer = _layer(capacity_factor=0.5)
    layer.impl = impl
    x = torch.randn(2, 40, 32)
    later = x.clone()
    later[:, 25:] = torch.randn(2, 15, 32)  # change the future: earlier outputs must not move
    y, y_later = layer(x), layer(later)
    assert layer.stats["dropped"] > 0
    assert torch.equal(y[0, :25], y_later[0, :25])
    layer.eval()  # dropless: a token's output does not depend on the rest of the batch at all
    torch.testing.assert_close(layer(x)[1:, 7], layer(x[1:, 7]), rtol=1e-5, atol=1e-6)
    assert layer.stats["dropped"] == 0


def test_router_and_experts_receive_gradients():
    torch.manual_seed(0)
    model = Phi2(Phi2Config(**TINY, moe={"num_experts": 4, "top_k": 2, "shared_experts": 1}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 256, (4, 32))
    model.train()
    for _ in range(2):  # zero-init output projections: w1 only gets a gradient once w2 has moved
        opt.zero_grad()
        model(x, x).loss.backward()
        opt.step()
    for i, layer in model.moe_layers().items():
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"layer {i} {name} got no gradient"


def _dense_and_moe(moe: dict):
    torch.manual_seed(0)
    dense = Phi2(Phi2Config(**TINY)).eval()
    torch.manual_seed(1)
    model = Phi2(Phi2Config(**TINY, moe=moe)).eval()
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and missing and all(".moe" in k for k in missing)
    return dense, model


@pytest.mark.parametrize("position", ["after_mlp", "parallel"])
def test_zero_init_is_identity(position):
    dense, model = _dense_and_moe({"num_experts": 4, "top_k": 2, "shared_experts": 1, "position": position})
    assert set(model.moe_layers()) == {0, 1}
    x = torch.randint(0, 256, (2, 24))
    assert torch.equal(dense(x), model(x))
    model.train()  # and in training, where the loss carries the routers' aux terms: the LM loss is the dense one
    out = model(x, x)
    assert out.aux_loss is not None and torch.equal(out.lm_loss, dense.train()(x, x).lm_loss)


@pytest.mark.parametrize("position", POSITIONS)
def test_every_and_placement(position):
    cfg = Phi2Config(**{**TINY, "n_layer": 4}, moe={"every": 2, "position": position})
    model = Phi2(cfg)
    assert set(model.moe_layers()) == {1, 3}
    block = model.layers[1]
    assert isinstance(block.mlp, MoE) == (position == "replace_mlp")
    assert isinstance(block.moe, MoE) == (position != "replace_mlp")
    assert (block.moe_layernorm is not None) == (position == "after_mlp")  # parallel reads the block's one LN
    assert model.layers[0].moe is None and not isinstance(model.layers[0].mlp, MoE)
    assert cfg.moe.expert_hidden == 64 // 2  # default: the MLP's width / top_k


def _perturbed(model: Phi2, seed: int = 2) -> Phi2:
    """Non-zero expert outputs and LayerNorm affines, so each placement's wiring shows in the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".moe." in name or ".mlp." in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("position", POSITIONS)
def test_block_formula(position):
    """after_mlp: x + attn(h) + mlp(h), then + moe(LN_moe(.)); parallel: x + attn(h) + mlp(h) + moe(h) from the
    block's one LayerNorm, no second residual step; replace_mlp: x + attn(h) + moe(h)."""
    torch.manual_seed(0)
    model = _perturbed(Phi2(Phi2Config(**TINY, moe={"num_experts": 4, "position": position})).eval())
    block, x = model.layers[0], torch.randn(2, 10, 32)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    h = block.input_layernorm(x)
    y = x + block.attn(h, cos, sin) + block.mlp(h)  # replace_mlp: block.mlp is the MoE
    if position == "after_mlp":
        y = y + block.moe(block.moe_layernorm(y))
    elif position == "parallel":
        y = y + block.moe(h)
    assert torch.equal(block(x, cos, sin), y)
    moe = block.mlp if position == "replace_mlp" else block.moe
    assert moe(h).abs().max() > 1e-2  # the MoE term is not zero, so a misplaced one would show


@pytest.mark.parametrize("position", POSITIONS)
def test_kv_cache_prefill_and_decode_match_one_pass(position):
    """Eval routing is dropless and per token, so cached decoding gives the logits of one full forward."""
    torch.manual_seed(0)
    model = _perturbed(Phi2(Phi2Config(**TINY, moe={"num_experts": 4, "capacity_factor": 0.5, "position": position})))
    model.eval()
    x = torch.randint(0, 256, (2, 12))
    cache = KVCache(model.cfg, 2, max_len=12)
    parts = [model(x[:, :7], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("position", POSITIONS)
def test_model_fast_path_equals_reference_loop(position, impl):
    """The whole model in each placement: the fast expert path gives the reference loop's loss and the gradient
    of every parameter (routed experts, shared expert, dense MLP, LayerNorms, attention)."""
    torch.manual_seed(0)
    cfg = Phi2Config(**TINY, moe={"num_experts": 4, "shared_experts": 1, "capacity_factor": 1.0, "position": position})
    model = _perturbed(Phi2(cfg)).train()
    x = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    results = {}
    for name in ("loop", impl):
        for layer in model.moe_layers().values():
            layer.impl = name
        model.zero_grad(set_to_none=True)
        loss = model(x, x).loss
        loss.backward()
        results[name] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (ref_loss, ref_grads), (loss, grads) = results["loop"], results[impl]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and any(".w2" in n for n in grads)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("position", POSITIONS)
def test_equal_active_parameters_recipe(position):
    """docs/moe.md's recipe: replace_mlp with the default expert_hidden (intermediate_size / top_k); after_mlp and
    parallel with the dense MLP halved and experts of intermediate_size / (2 top_k). Each then has the dense
    model's active matmul parameters, plus only the router (and after_mlp's LayerNorm) per MoE block."""
    dense_cfg = dict(TINY, n_layer=4)
    I, E, k, d = dense_cfg["intermediate_size"], 8, 2, dense_cfg["n_embd"]
    moe = {"num_experts": E, "top_k": k, "position": position}
    if position == "replace_mlp":
        cfg = Phi2Config(**dense_cfg, moe=moe)
    else:
        cfg = Phi2Config(**{**dense_cfg, "intermediate_size": I // 2}, moe={**moe, "expert_hidden": I // (2 * k)})
    dense, model = Phi2(Phi2Config(**dense_cfg)), Phi2(cfg)
    extra = E * d + (2 * d if position == "after_mlp" else 0)  # router [E, d]; LN_moe weight and bias
    # replace_mlp's k active experts carry k output biases where the MLP had one
    extra += (k - 1) * d if position == "replace_mlp" else k * d  # each active expert's b2 [d]
    assert matmul_params(model) - matmul_params(dense) == 4 * extra
    assert model.num_params() > dense.num_params()  # more parameters in total, the same active ones


def test_training_loss_adds_aux_only_in_training():
    torch.manual_seed(0)
    model = Phi2(Phi2Config(**TINY, moe={"num_experts": 4}))
    x = torch.randint(0, 256, (2, 16))
    model.train()
    out = model(x, x)
    torch.testing.assert_close(out.loss.detach(), (out.lm_loss + model.moe_aux_loss()).detach())
    assert model.moe_aux_loss() > 0 and torch.equal(out.aux_loss, model.moe_aux_loss())
    model.eval()
    out = model(x, x)
    assert out.aux_loss is None and torch.equal(out.loss, out.lm_loss)


def _imbalance_after_training(steps=60, **kw) -> float:
    """Train one MoE layer on a regression task whose inputs share a large common direction, which routes
    most tokens to the same few experts; return the imbalance (max/mean load) on fresh inputs."""
    torch.manual_seed(0)
    d = 16
    layer = MoE(MoEConfig(num_experts=8, top_k=2, expert_hidden=16, z_loss_coef=0.0, **kw), d)
    offset, target = torch.randn(d), torch.randn(d, d) / d**0.5
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(256, d) + offset
        loss = (layer(x) - x @ target).square().mean() + layer.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.update_bias()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2048, d) + offset)
    return float(layer.stats["imbalance"])


def test_aux_loss_lowers_imbalance():
    without = _imbalance_after_training(aux_loss_coef=0.0)
    with_aux = _imbalance_after_training(aux_loss_coef=0.1)
    assert without > 2.0  # the toy task is imbalanced to begin with
    assert with_aux < 0.75 * without, (with_aux, without)


def test_bias_balancing_lowers_imbalance():
    without = _imbalance_after_training(aux_loss_coef=0.0)
    with_bias = _imbalance_after_training(aux_loss_coef=0.0, bias_balancing=True, bias_update_rate=0.02)
    assert with_bias < 0.75 * without, (with_bias, without)


def test_update_bias_favours_underloaded_experts():
    layer = MoE(MoEConfig(num_experts=4, top_k=1, expert_hidden=8, bias_balancing=True, bias_update_rate=0.1), 8)
    layer.train()
    layer._load_sum = torch.tensor([10, 0, 3, 3])
    layer.update_bias()
    torch.testing.assert_close(layer.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    layer.update_bias()  # nothing routed since: no change
    torch.testing.assert_close(layer.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    layer.eval()
    layer(torch.randn(5, 8))  # eval forwards do not count towards the balance
    assert layer._load_sum is None


@pytest.mark.parametrize("bad, match", [
    ({"top_k": 0}, "top_k"),
    ({"num_experts": 2, "top_k": 3}, "top_k"),
    ({"position": "before_mlp"}, "position"),
    ({"router": "relu"}, "router"),
    ({"capacity_factor": 0}, "capacity_factor"),
    ({"every": 0}, "every"),
    ({"aux_loss_coef": -1}, "aux_loss_coef"),
    ({"num_expert": 8}, "unknown config key 'moe.num_expert'"),
    ({"top_k": "two"}, "moe.top_k"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        Phi2Config(**TINY, moe=bad)


def test_train_config_accepts_moe_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\n  moe:\n    num_experts: 4\n")
    from phiforge.train.config import TrainConfig

    cfg = load_config(TrainConfig, path, ["model.moe.top_k=1", "model.moe.capacity_factor=1.25"])
    moe = cfg.model_config().moe
    assert (moe.num_experts, moe.top_k, moe.capacity_factor, moe.expert_hidden) == (4, 1, 1.25, 320)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = Phi2Config(**TINY, moe={"num_experts": 4, "router": "sigmoid", "bias_balancing": True, "every": 2})
    model = Phi2(cfg)
    with torch.no_grad():
        for layer in model.moe_layers().values():
            layer.w2.normal_(0, 0.05)
            layer.expert_bias.normal_(0, 0.1)
    model.eval()
    save_checkpoint(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["model"]["moe"]["router"] == "sigmoid"
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.cfg == cfg
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded.layers[1].moe.expert_bias, model.layers[1].moe.expert_bias)


def test_upcycle_zero_is_identity_and_copy_matches_mlp(tmp_path, capsys):
    torch.manual_seed(0)
    dense = Phi2(Phi2Config(**TINY)).eval()
    save_checkpoint(dense, tmp_path / "dense")
    x = torch.randint(0, 256, (2, 24))
    assert main(["convert", "upcycle", str(tmp_path / "dense"), str(tmp_path / "zero"),
                 "--moe", "num_experts=4,top_k=2,every=2"]) == 0
    zero = load_checkpoint(tmp_path / "zero")
    assert set(zero.moe_layers()) == {1}
    assert torch.equal(zero(x), dense(x))
    # replace_mlp + copy without noise: top-2 gates sum to 1 over identical experts = the dense MLP
    assert main(["convert", "upcycle", str(tmp_path / "dense"), str(tmp_path / "copy"), "--init", "copy",
                 "--noise", "0", "--moe", '{"num_experts": 4, "position": "replace_mlp"}']) == 0
    copy = load_checkpoint(tmp_path / "copy")
    torch.testing.assert_close(copy(x), dense(x), rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert_one_line_error(*run_cli(capsys, "convert", "upcycle", tmp_path / "zero", tmp_path / "again",
                                   "--moe", "top_k=1")[::2], "already has MoE layers")
    assert_one_line_error(*run_cli(capsys, "convert", "upcycle", tmp_path / "dense", tmp_path / "bad",
                                   "--moe", "top_k=1,expert_hidden=8", "--init", "copy")[::2], "expert_hidden")


def test_upcycle_parallel_zero_is_identity_and_copy_splits_the_mlp(tmp_path):
    torch.manual_seed(0)
    dense = Phi2(Phi2Config(**TINY)).eval()
    save_checkpoint(dense, tmp_path / "dense")
    x = torch.randint(0, 256, (2, 24))
    assert main(["convert", "upcycle", str(tmp_path / "dense"), str(tmp_path / "zero"),
                 "--moe", "num_experts=4,top_k=2,position=parallel"]) == 0
    zero = load_checkpoint(tmp_path / "zero")
    assert zero.cfg.moe.position == "parallel" and set(zero.moe_layers()) == {0, 1}
    assert not any("moe_layernorm" in k for k in zero.state_dict())
    assert torch.equal(zero(x), dense(x))  # step 0 of the upcycled model is the dense model, bit for bit
    # copy without noise: the MLP that stays and the expert copies each carry half the MLP's output
    assert main(["convert", "upcycle", str(tmp_path / "dense"), str(tmp_path / "copy"), "--init", "copy",
                 "--noise", "0", "--moe", "num_experts=4,top_k=2,position=parallel"]) == 0
    copy = load_checkpoint(tmp_path / "copy")
    assert torch.equal(copy.layers[0].mlp.fc2.weight, dense.layers[0].mlp.fc2.weight / 2)
    assert torch.equal(copy.layers[0].moe.w2[3], dense.layers[0].mlp.fc2.weight.t() / 2)
    assert copy.layers[0].moe(torch.randn(5, 32)).abs().max() > 1e-2  # the experts are live, not zero
    torch.testing.assert_close(copy(x), dense(x), rtol=1e-5, atol=1e-5)


def test_training_from_upcycled_parallel_checkpoint_starts_as_the_dense_model(gutenberg_dir, tmp_path, capsys):
    """Step 0 of `phiforge train` from a dense checkpoint upcycled with `parallel` experts is the dense run's:
    the same validation loss and the same first training loss (bit for bit, one thread); then the experts learn."""
    torch.manual_seed(0)
    small = dict(n_layer=2, n_embd=32, n_head=2, intermediate_size=64, max_seq_len=64)  # the data's vocabulary
    save_checkpoint(Phi2(Phi2Config(**small)), tmp_path / "dense", tokenizer_dir=gutenberg_dir)
    assert main(["convert", "upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"),
                 "--moe", "num_experts=4,top_k=2,position=parallel"]) == 0
    events = {}
    for name in ("dense", "moe"):
        sets = [f"data.dir={gutenberg_dir}", f"out_dir={tmp_path / name}-run", f"init_from={tmp_path / name}",
                "data.seq_len=32", "micro_batch_size=2", "max_steps=2", "log_interval=1", "eval_interval=2",
                "eval_batches=1", "threads=1", "progress_bar=false"]
        code, _, err = run_cli(capsys, "train", *sum((["--set", s] for s in sets), []))
        assert code == 0, err
        lines = (tmp_path / f"{name}-run" / "metrics.jsonl").read_text().splitlines()
        events[name] = [json.loads(line) for line in lines]
    first = {n: ([e["val_loss"] for e in ev if e["event"] == "eval"][0],
                 [e["loss"] for e in ev if e["event"] == "train"][0]) for n, ev in events.items()}
    assert first["moe"] == first["dense"]
    moe = [e for e in events["moe"] if e["event"] == "moe"]
    assert moe and set(moe[-1]["layers"]) == {"0", "1"}  # the experts were there and routed
    state = load_checkpoint(resolve_checkpoint(tmp_path / "moe-run")).state_dict()
    assert state["layers.0.moe.w2"].abs().sum() > 0  # and learned after step 0


@pytest.mark.parametrize("position", POSITIONS)
def test_hf_and_litgpt_export_of_moe_model_fails_clearly(tmp_path, capsys, position):
    model = Phi2(Phi2Config(**TINY, moe={"num_experts": 2, "top_k": 1, "position": position}))
    save_checkpoint(model, tmp_path / "moe")
    code, _, err = run_cli(capsys, "convert", "to-hf", tmp_path / "moe", tmp_path / "hf")
    assert_one_line_error(code, err, "moe", "cannot be represented in a Hugging Face PhiConfig")
    assert not (tmp_path / "hf").exists()
    code, _, err = run_cli(capsys, "convert", "to-litgpt", tmp_path / "moe", tmp_path / "lit")
    assert_one_line_error(code, err, "moe", "cannot be represented in a LitGPT Config")
    assert not (tmp_path / "lit").exists()


@pytest.mark.parametrize("position", ["after_mlp", "parallel"])
def test_moe_report_writes_png(tmp_path, capsys, position):
    torch.manual_seed(0)
    model = Phi2(Phi2Config(**TINY, moe={"num_experts": 4, "capacity_factor": 1.0, "position": position})).train()
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"event": "start"}) + "\n")
        for step in (10, 20, 30):
            model(torch.randint(0, 256, (2, 16)))
            f.write(json.dumps({"event": "moe", "step": step, "tokens": step * 32, "layers": moe_metrics(model)}) + "\n")
    assert main(["moe-report", str(run), "--out", str(tmp_path / "load.png")]) == 0
    assert (tmp_path / "load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["moe-report", str(run)]) == 0 and (run / "moe-load.png").exists()


@pytest.mark.parametrize("position", ["after_mlp", "parallel"])
def test_compiles_without_graph_breaks(position):
    """With a capacity the layer has no host sync, so the whole model traces as one graph (aot_eager: no C++
    compiler needed); losses, gradients and the side-channel stats match eager."""
    torch.manual_seed(0)
    moe = {"num_experts": 4, "capacity_factor": 1.0, "bias_balancing": True, "position": position}
    model = Phi2(Phi2Config(**TINY, moe=moe)).train()
    with torch.no_grad():
        for layer in model.moe_layers().values():
            layer.w2.normal_(0, 0.1)
    x = torch.randint(0, 256, (2, 16))
    ref = model(x, x).loss
    ref.backward()
    ref_grad, ref_load = model.layers[0].moe.router.grad.clone(), model.layers[0].moe._load_sum.clone()
    model.zero_grad()
    model.layers[0].moe._load_sum = None
    loss = torch.compile(model, backend="aot_eager", fullgraph=True)(x, x).loss
    loss.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(model.layers[0].moe.router.grad, ref_grad)
    assert torch.equal(model.layers[0].moe._load_sum, ref_load)


def test_train_loop_logs_moe_metrics_and_balances(gutenberg_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(
        capsys, "train", "--set", f"data.dir={gutenberg_dir}", "--set", f"out_dir={run}",
        "--set", "model={n_layer: 2, n_embd: 32, n_head: 2, intermediate_size: 64, max_seq_len: 64, "
                 "moe: {num_experts: 4, every: 2, bias_balancing: true, capacity_factor: 1.0}}",
        "--set", "data.seq_len=32", "--set", "micro_batch_size=4", "--set", "grad_accum_steps=2",
        "--set", "max_steps=4", "--set", "log_interval=2", "--set", "eval_interval=4", "--set", "eval_batches=1",
        "--set", "optim.warmup_steps=1")
    assert code == 0, err
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    moe = [e for e in events if e["event"] == "moe"]
    assert [e["step"] for e in moe] == [2, 4] and set(moe[-1]["layers"]) == {"1"}
    stats = moe[-1]["layers"]["1"]
    assert len(stats["load"]) == 4 and abs(sum(stats["load"]) - 1) < 1e-4
    # the last training micro-batch: 4 x 32 tokens, 2 choices each, capacity ceil(1.0 * 128 * 2 / 4) = 64 per expert
    counts = [round(share * 128 * 2) for share in stats["load"]]
    assert sum(counts) == 256
    assert stats["imbalance"] == pytest.approx(max(stats["load"]) * 4, abs=1e-4)
    assert stats["dropped"] == sum(max(0, c - 64) for c in counts)
    assert stats["aux"] > 0
    train_loss = [e["loss"] for e in events if e["event"] == "train"]
    assert all(5 < loss < 12 for loss in train_loss)  # the pure LM loss (ln 51200 = 10.8 at init)
    model = load_checkpoint(run / "checkpoints" / (run / "latest").read_text().strip())
    assert model.layers[1].moe.expert_bias.abs().sum() > 0  # 4 bias updates happened and were saved
    code, out, err = run_cli(capsys, "moe-report", run)
    assert code == 0 and (run / "moe-load.png").exists(), err


def test_moe_report_errors_are_one_line(tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "moe-report", tmp_path / "nope")[::2], "run directory not found")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1, "loss": 5.0}) + "\n")
    assert_one_line_error(*run_cli(capsys, "moe-report", tmp_path)[::2], "no MoE metrics")
