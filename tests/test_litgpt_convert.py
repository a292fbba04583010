"""phiforge <-> LitGPT checkpoints: equal logits against litgpt.GPT both ways, bit-identical round trips, and a
.pth that would run code is refused.

Small random models are built on the spot. Every parameter, LayerNorms included, is perturbed so that a wrong
key mapping or a wrong q/k/v order cannot hide behind ones and zeros. Tests that need litgpt itself skip only
where the optional extra is not installed (CI installs it: `pip install -e '.[test,litgpt]'`).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from phiforge.litgpt.convert import (
    config_from_litgpt,
    config_to_litgpt,
    load_lit_weights,
    qkv_from_grouped,
    qkv_to_grouped,
    state_dict_from_litgpt,
    state_dict_to_litgpt,
)
from phiforge.model import Phi2, Phi2Config
from phiforge.model_files import load_checkpoint, load_state_dict, save_checkpoint
from conftest import assert_one_line_error, run_cli

VOCAB = 512
REL_TOL = 1e-5

CASES = {
    "mha": {},
    "gqa": {"n_kv_head": 2},
    "mqa-qk_layernorm": {"n_kv_head": 1, "qk_layernorm": True},
    "rotary-0.5-theta-500": {"rotary_pct": 0.5, "rope_theta": 500.0, "layer_norm_eps": 1e-6},
}


def perturb_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def our_model(seed: int = 0, **overrides) -> Phi2:
    base = dict(vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, intermediate_size=256, max_seq_len=64)
    torch.manual_seed(seed)
    model = Phi2(Phi2Config(**{**base, **overrides})).eval()
    perturb_(model, seed + 1)
    return model


def lit_gpt(cfg: Phi2Config):
    import litgpt
    return litgpt.GPT(litgpt.Config(**config_to_litgpt(cfg))).eval()


def tokens(n: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(7))


def assert_close_logits(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < REL_TOL, f"logits differ: max abs diff / max abs logit = {rel:.2e}"


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------------------
# Against litgpt itself


def test_phi2_config_is_litgpt_phi2_entry():
    import litgpt
    ours = litgpt.Config(**config_to_litgpt(Phi2Config.from_preset("phi-2")))
    assert ours == litgpt.Config.from_name("phi-2")
    back = config_from_litgpt(dataclasses.asdict(litgpt.Config.from_name("phi-2")))
    assert back == Phi2Config.from_preset("phi-2")


def test_scaled_member_is_phi2_entry_with_overrides():
    import litgpt
    cfg = Phi2Config.from_preset("small", n_kv_head=2)
    lit = litgpt.Config(**config_to_litgpt(cfg))
    ref = litgpt.Config.from_name("phi-2", n_layer=4, n_embd=128, n_head=4, n_query_groups=2, head_size=32,
                                  intermediate_size=512, block_size=512, rotary_percentage=0.4)
    assert dataclasses.replace(lit, name=ref.name, hf_config=ref.hf_config) == ref
    assert lit.name.startswith("phi-2-") and lit.rope_n_elem == cfg.rotary_dim


@pytest.mark.parametrize("overrides", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("layout", ["split", "grouped"])
def test_to_litgpt_gives_litgpt_the_same_logits(overrides, layout):
    ours = our_model(**overrides)
    lit = lit_gpt(ours.cfg)
    # "grouped" goes in under LitGPT's legacy `attn.attn` keys, which litgpt re-lays itself (qkv_reassemble)
    lit.load_state_dict(state_dict_to_litgpt(ours.state_dict(), ours.cfg, layout), strict=True)
    idx = tokens()
    with torch.no_grad():
        assert_close_logits(ours(idx), lit(idx))


@pytest.mark.parametrize("overrides", list(CASES.values()), ids=list(CASES))
def test_from_litgpt_gives_phiforge_the_same_logits(tmp_path, capsys, overrides):
    from litgpt.utils import save_config

    cfg = our_model(**overrides).cfg
    torch.manual_seed(3)
    lit = lit_gpt(cfg)
    perturb_(lit, 4)
    src = tmp_path / "lit"
    src.mkdir()
    # as `litgpt pretrain` saves it: {"model": ..., "optimizer": ..., "iter_num": ...} plus model_config.yaml
    torch.save({"model": lit.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "iter_num": 3}, src / "lit_model.pth")
    save_config(lit.config, src)
    code, out, err = run_cli(capsys, "convert", "from-litgpt", src, tmp_path / "ours")
    assert code == 0, err
    assert "from-litgpt" in out
    ours = load_checkpoint(tmp_path / "ours")
    assert ours.cfg == cfg
    idx = tokens()
    with torch.no_grad():
        assert_close_logits(ours(idx), lit(idx))


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_grouped_layout_matches_litgpt_qkv_reassemble(heads, groups):
    from litgpt import Config
    from litgpt.scripts.convert_hf_checkpoint import qkv_reassemble

    hd = 8
    cfg = Config(n_embd=heads * hd, n_head=heads, n_query_groups=groups, head_size=hd, padded_vocab_size=64)
    for shape in [((heads + 2 * groups) * hd, heads * hd), ((heads + 2 * groups) * hd,)]:
        split = torch.randn(shape)
        grouped = qkv_to_grouped(split, heads, groups, hd)
        assert torch.equal(qkv_reassemble(grouped, cfg), split)
        assert torch.equal(qkv_from_grouped(grouped, heads, groups, hd), split)
        if groups > 1:
            assert not torch.equal(grouped, split)  # the layouts really differ (with one group they coincide)


def test_litgpt_pretrain_checkpoint_loads_as_phiforge(tmp_path):
    """A real (tiny) litgpt.GPT trained one step by hand, saved the way Fabric saves it, converts exactly."""
    cfg = our_model().cfg
    lit = lit_gpt(cfg).train()
    opt = torch.optim.AdamW(lit.parameters(), lr=1e-3)
    idx = tokens(2, 17)
    torch.nn.functional.cross_entropy(lit(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    opt.step()
    (tmp_path / "lit").mkdir()
    torch.save({"model": lit.state_dict(), "optimizer": opt.state_dict(), "iter_num": 1, "step_count": 1},
               tmp_path / "lit" / "lit_model.pth")
    (tmp_path / "lit" / "model_config.yaml").write_text(yaml.safe_dump(config_to_litgpt(cfg)))
    state = load_lit_weights(tmp_path / "lit" / "lit_model.pth")
    assert_same_tensors(state, lit.state_dict())
    ours = Phi2(cfg)
    ours.load_state_dict(state_dict_from_litgpt(state, cfg), strict=True)
    with torch.no_grad():
        assert_close_logits(ours.eval()(idx), lit.eval()(idx))


# ---------------------------------------------------------------------------------------------------------------
# Without litgpt: round trips, refusals


@pytest.mark.parametrize("layout, dtype", [("split", None), ("grouped", None), ("split", "bfloat16")])
def test_round_trip_is_bitwise(tmp_path, capsys, layout, dtype):
    model = our_model(n_kv_head=2, qk_layernorm=True)
    save_checkpoint(model, tmp_path / "a")
    extra = ["--qkv-layout", layout] + (["--dtype", dtype] if dtype else [])
    code, _, err = run_cli(capsys, "convert", "to-litgpt", tmp_path / "a", tmp_path / "lit", *extra)
    assert code == 0, err
    assert {"lit_model.pth", "model_config.yaml", "tokenizer.json"} <= {p.name for p in (tmp_path / "lit").iterdir()}
    lit_keys = load_lit_weights(tmp_path / "lit" / "lit_model.pth")
    assert any(".attn.attn." in k for k in lit_keys) == (layout == "grouped")
    code, _, err = run_cli(capsys, "convert", "from-litgpt", tmp_path / "lit", tmp_path / "b")
    assert code == 0, err
    a, b = load_state_dict(tmp_path / "a"), load_state_dict(tmp_path / "b")
    if dtype:
        a = {k: v.to(getattr(torch, dtype)) for k, v in a.items()}
    assert_same_tensors(a, b)


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickled_code_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "lit"
    src.mkdir()
    torch.save({"model": {"lm_head.weight": torch.zeros(2, 2)}, "hook": _Boom()}, src / "lit_model.pth")
    (src / "model_config.yaml").write_text(yaml.safe_dump(config_to_litgpt(our_model().cfg)))
    code, _, err = run_cli(capsys, "convert", "from-litgpt", src, tmp_path / "out")
    assert_one_line_error(code, err, f"refusing LitGPT weights {src / 'lit_model.pth'}", "system",
                          "phiforge never runs code a file carries")
    assert "weights_only" not in err  # issue 21 item 12: never torch's advice to load it with weights_only=False
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    assert not (tmp_path / "out").exists()


def test_moe_model_cannot_go_to_litgpt(tmp_path, capsys):
    save_checkpoint(our_model(moe={"num_experts": 4, "top_k": 2}), tmp_path / "moe")
    code, _, err = run_cli(capsys, "convert", "to-litgpt", tmp_path / "moe", tmp_path / "lit")
    assert_one_line_error(code, err, "moe", "LitGPT")


def test_non_phi_litgpt_model_is_refused(tmp_path, capsys):
    src = tmp_path / "lit"
    src.mkdir()
    llama = {**config_to_litgpt(our_model().cfg), "norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP",
             "parallel_residual": False, "shared_attention_norm": False}
    (src / "model_config.yaml").write_text(yaml.safe_dump(llama))
    torch.save({}, src / "lit_model.pth")
    code, _, err = run_cli(capsys, "convert", "from-litgpt", src, tmp_path / "out")
    assert_one_line_error(code, err, "RMSNorm", "not a Phi-2-family")


def test_wrong_shapes_name_the_key(tmp_path, capsys):
    model = our_model()
    save_checkpoint(model, tmp_path / "a")
    assert run_cli(capsys, "convert", "to-litgpt", tmp_path / "a", tmp_path / "lit")[0] == 0
    cfg = yaml.safe_load((tmp_path / "lit" / "model_config.yaml").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "lit" / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(capsys, "convert", "from-litgpt", tmp_path / "lit", tmp_path / "b")
    assert_one_line_error(code, err, "wrong shape", "transformer.h.0.mlp.fc")
