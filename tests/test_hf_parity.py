"""phiforge <-> Hugging Face PhiForCausalLM: same logits, same greedy tokens, bit-identical round trips.

Small random models are built on the spot (no network). Every parameter, LayerNorms included, is perturbed
so that a wrong key mapping or a wrong q/k/v order cannot hide behind ones and zeros.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

from phiforge.cli import main
from phiforge.errors import CheckpointError
from phiforge.generate import generate
from phiforge.hf import config_from_hf, config_to_hf, state_dict_to_hf
from phiforge.model import Phi2, Phi2Config, count_params_meta
from phiforge.model_files import load_checkpoint, load_state_dict, read_config, save_checkpoint
from phiforge.tokenizer import load_tokenizer

VOCAB = 512
REL_TOL = 1e-5


def perturb_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def hf_model(seed: int = 0, **overrides) -> PhiForCausalLM:
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               partial_rotary_factor=0.4, max_position_embeddings=128, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = PhiForCausalLM(PhiConfig(**{**cfg, **overrides}, attn_implementation="eager")).eval()
    perturb_(model, seed)
    return model


def hf_greedy(model: PhiForCausalLM, idx: torch.Tensor, n: int) -> torch.Tensor:
    model.generation_config.eos_token_id = None  # never stop early (and min_new_tokens then masks nothing)
    model.generation_config.pad_token_id = 0
    out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)
    assert out.shape == (idx.size(0), idx.size(1) + n)
    return out


def assert_parity(hf: PhiForCausalLM, ours: Phi2, vocab: int) -> None:
    idx = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)
    assert got.shape == ref.shape
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < REL_TOL, f"logits differ: max abs diff / max abs logit = {rel:.2e}"
    assert torch.equal(generate(ours, idx, 32, temperature=0.0), hf_greedy(hf, idx, 32))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("overrides, shard", [
    ({}, None),
    ({"qk_layernorm": True}, "40KB"),
    ({"num_key_value_heads": 2, "partial_rotary_factor": 0.5, "rope_theta": 500.0}, "40KB"),
], ids=["mha", "qk_layernorm-sharded", "gqa-sharded"])
def test_from_hf_matches_transformers(tmp_path, overrides, shard):
    hf = hf_model(**overrides)
    kwargs = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True, **kwargs)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == bool(shard)

    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = load_checkpoint(tmp_path / "ours")
    assert ours.cfg.vocab_size == VOCAB and ours.cfg.n_kv_head == hf.config.num_key_value_heads
    assert_parity(hf, ours, VOCAB)


def test_to_hf_matches_ours_and_loads_with_auto_classes(tmp_path, capsys):
    # Full GPT-2 vocabulary (50295 -> padded 50304) so bos/eos 50256 and the tokenizer ids are real.
    cfg = Phi2Config(vocab_size=50295, n_layer=2, n_embd=64, n_head=4, intermediate_size=256, max_seq_len=128,
                     qk_layernorm=True)
    torch.manual_seed(0)
    ours = Phi2(cfg).eval()
    perturb_(ours, 0)
    save_checkpoint(ours, tmp_path / "ours")

    assert main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    summary = capsys.readouterr().out
    assert f"{ours.num_params():,}" in summary and "float32" in summary and "model.safetensors" in summary

    hf, info = PhiForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                              output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert hf.config.vocab_size == 50304 and hf.config.eos_token_id == 50256
    assert_parity(hf.eval(), ours, 50304)

    text = "Hello world, this is phiforge.<|endoftext|>"
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = load_tokenizer(tmp_path / "ours").encode(text).ids
    assert tok(text)["input_ids"] == ids and ids[-1] == 50256
    assert tok.decode(ids) == text


def test_round_trips_are_bit_identical(tmp_path):
    # HF -> ours -> HF, in fp16 (dtype kept), sharded, with GQA and qk_layernorm
    hf = hf_model(num_key_value_heads=2, qk_layernorm=True).half()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="40KB")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert {v.dtype for v in load_state_dict(tmp_path / "ours").values()} == {torch.float16}
    assert main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "hf2"),
                 "--max-shard-size", "40KB"]) == 0
    assert (tmp_path / "hf2" / "model.safetensors.index.json").exists()
    assert_same_tensors(load_state_dict(tmp_path / "hf"), load_state_dict(tmp_path / "hf2"))
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["torch_dtype"] == "float16"

    # ours -> HF -> ours
    assert main(["convert", "from-hf", str(tmp_path / "hf2"), str(tmp_path / "ours2")]) == 0
    assert_same_tensors(load_state_dict(tmp_path / "ours"), load_state_dict(tmp_path / "ours2"))
    assert read_config(tmp_path / "ours2") == read_config(tmp_path / "ours")


def test_to_hf_dtype_cast(tmp_path):
    cfg = Phi2Config(vocab_size=VOCAB, n_layer=1, n_embd=32, n_head=2, intermediate_size=64, max_seq_len=64)
    torch.manual_seed(0)
    ours = Phi2(cfg)
    save_checkpoint(ours, tmp_path / "ours")
    assert main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    expected = {k: v.to(torch.bfloat16) for k, v in state_dict_to_hf(ours.state_dict(), cfg).items()}
    assert_same_tensors(expected, load_state_dict(tmp_path / "hf"))
    assert PhiForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype="auto").dtype == torch.bfloat16


def test_config_from_transformers_5_rope_parameters():
    """transformers >= 5 writes partial_rotary_factor and rope_theta inside rope_parameters, not at the top."""
    v4 = config_to_hf(Phi2Config.from_preset("phi-2"))
    v5 = {k: v for k, v in v4.items() if k not in ("partial_rotary_factor", "rope_theta")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4}
    assert config_from_hf(v5) == config_from_hf(v4) == Phi2Config.from_preset("phi-2")
    assert config_from_hf({**v5, "rope_parameters": {**v5["rope_parameters"], "rope_theta": 500.0}}).rope_theta == 500.0
    with pytest.raises(CheckpointError, match="rope_parameters"):
        config_from_hf({**v5, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_phi2_config_and_keys_match_microsoft_phi2():
    cfg = Phi2Config.from_preset("phi-2")
    hf_cfg = config_to_hf(cfg, torch_dtype="float16")
    assert config_from_hf(hf_cfg) == cfg
    assert count_params_meta(config_from_hf(hf_cfg))[0] == 2_779_683_840
    # transformers builds the same shape from our config.json
    with torch.device("meta"):
        hf = PhiForCausalLM(PhiConfig(**hf_cfg))
        ours = Phi2(cfg)
    hf_keys = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert hf_keys == {k: tuple(v.shape) for k, v in state_dict_to_hf(ours.state_dict(), cfg).items()}
    assert "model.layers.31.self_attn.q_proj.weight" in hf_keys and "lm_head.bias" in hf_keys
