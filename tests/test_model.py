import pytest
import torch

from phiforge.cli import main
from phiforge.errors import ConfigError
from phiforge.generate import generate, generate_uncached
from phiforge.model import KVCache, Phi2, Phi2Config, count_params_meta
from phiforge.model.phi2 import apply_rope


def sharp_model(seed=0, **overrides):
    """A tiny model with large random weights, so greedy decoding is not a tie-break lottery."""
    torch.manual_seed(seed)
    cfg = Phi2Config.from_preset("tiny", **overrides)
    model = Phi2(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.ndim > 1 else p.normal_(0, 0.1)
    return model


def test_phi2_parameter_count_exact():
    total, non_emb = count_params_meta(Phi2Config.from_preset("phi-2"))
    assert total == 2_779_683_840
    assert total - non_emb == 51200 * 2560


def test_info_cli_reports_phi2_count(capsys):
    assert main(["info", "--preset", "phi-2"]) == 0
    assert "2,779,683,840" in capsys.readouterr().out


def phi2_param_count(vocab: int, n_layer: int, d: int, ff: int) -> int:
    """Phi-2's parameters by hand: per layer one LayerNorm, q/k/v/dense and fc1/fc2 (all with bias); the final
    LayerNorm, the embedding and the lm_head with its bias."""
    layer = 2 * d + 4 * (d * d + d) + (d * ff + ff) + (ff * d + d)
    return n_layer * layer + 2 * d + vocab * d + vocab * d + vocab


@pytest.mark.parametrize("preset,shape", [("phi-2", (51200, 32, 2560, 10240)), ("tiny", (4096, 3, 80, 320)),
                                          ("small", (51200, 4, 128, 512)), ("base", (51200, 12, 640, 2560))])
def test_preset_sizes_are_exact(preset, shape):
    total, non_emb = count_params_meta(Phi2Config.from_preset(preset))
    assert total == phi2_param_count(*shape)
    assert total - non_emb == shape[0] * shape[2]
    if preset == "phi-2":
        assert total == 2_779_683_840  # docs: per layer 78,671,360


def test_vocab_padded_to_multiple_of_64():
    assert Phi2Config(vocab_size=50257, n_layer=1, n_embd=64, n_head=4).vocab_size == 50304
    assert Phi2Config(vocab_size=51200).vocab_size == 51200


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown preset"):
        Phi2Config.from_preset("phi-3")
    with pytest.raises(ConfigError, match="n_layers"):
        Phi2Config.from_preset("tiny", n_layers=2)
    with pytest.raises(ConfigError, match="divisible"):
        Phi2Config(n_embd=100, n_head=3)


def test_rope_leaves_dims_past_rotary_dim_untouched():
    cfg = Phi2Config.from_preset("tiny")
    model = Phi2(cfg)
    x = torch.randn(1, 2, 5, cfg.head_dim)
    y = apply_rope(x, model.rope_cos[:5], model.rope_sin[:5])
    r = cfg.rotary_dim
    assert 0 < r < cfg.head_dim
    assert torch.equal(y[..., r:], x[..., r:])
    assert not torch.allclose(y[..., 1:, :r], x[..., 1:, :r])
    assert torch.allclose(y[..., 0, :], x[..., 0, :])  # position 0 is a zero rotation


def test_causal_future_tokens_do_not_change_past_logits():
    model = sharp_model()
    x = torch.randint(0, 4096, (1, 12))
    a = model(x)
    x2 = x.clone()
    x2[0, 8:] = (x2[0, 8:] + 1) % 4096
    b = model(x2)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_kv_cache_decoding_equals_full_recomputation():
    model = sharp_model()
    x = torch.randint(0, 4096, (2, 9))
    cached = generate(model, x, max_new_tokens=30, temperature=0.0)
    full = generate_uncached(model, x, max_new_tokens=30)
    assert cached.shape == (2, 39)
    assert torch.equal(cached, full)


def test_chunked_prefill_with_cache_matches_one_pass():
    model = sharp_model(qk_layernorm=True)
    x = torch.randint(0, 4096, (2, 20))
    ref = model(x)
    cache = KVCache(model.cfg, 2, max_len=20)
    parts = [model(x[:, :7], cache=cache), model(x[:, 7:8], cache=cache), model(x[:, 8:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), ref, rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_respects_top_k():
    model = sharp_model()
    x = torch.randint(0, 4096, (1, 5))
    a = generate(model, x, 20, temperature=1.0, top_k=5, seed=3)
    b = generate(model, x, 20, temperature=1.0, top_k=5, seed=3)
    assert torch.equal(a, b)
    # with top_k=1 sampling must equal greedy
    assert torch.equal(generate(model, x, 20, temperature=1.0, top_k=1, seed=3), generate(model, x, 20))


def test_top_p_keeps_smallest_nucleus():
    from phiforge.generate import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample_next(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(i))) for i in range(200)}
    assert seen == {0, 1}


def test_loss_matches_manual_cross_entropy():
    model = sharp_model()
    x = torch.randint(0, 4096, (2, 10))
    y = torch.randint(0, 4096, (2, 10))
    logits = model(x)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    torch.testing.assert_close(model(x, y).lm_loss, ref)
