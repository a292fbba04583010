"""Cross-attention in the Phi-2 model: closed gates change nothing, configs round-trip, the context's K/V is
computed once per generated sequence and cached generation equals uncached generation."""

from __future__ import annotations

import pytest
import torch

from phiforge.errors import ConfigError
from phiforge.generate import generate, generate_uncached
from phiforge.model import Phi2, Phi2Config
from phiforge.model.xattn import XAttnConfig
from phiforge.model_files import load_checkpoint, save_checkpoint
from phiforge.vision.config import ProjectorConfig
from phiforge.vision.model import add_cross_attention
from phiforge.vision.projector import PerceiverResampler

CFG = dict(vocab_size=256, n_layer=4, n_embd=32, n_head=2, intermediate_size=64, max_seq_len=64)
XATTN = XAttnConfig(every=2, context_dim=24, heads=2)


def open_gates(model: Phi2) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.5)


def test_closed_gates_leave_a_text_model_unchanged():
    torch.manual_seed(0)
    text = Phi2(Phi2Config(**CFG)).eval()
    model = add_cross_attention(text, XATTN).eval()
    assert [i for i, b in enumerate(model.layers) if b.xattn is not None] == [1, 3]
    idx = torch.randint(0, 256, (2, 10))
    context = torch.randn(2, 5, 24)
    expected = text(idx)
    assert torch.equal(model(idx, context=context), expected)  # gates at 0: exactly the text model
    assert torch.equal(model(idx), expected)  # no context: the sublayers are skipped
    open_gates(model)
    assert not torch.allclose(model(idx, context=context), expected)  # open gates: the context matters


def test_xattn_config_round_trips_through_a_checkpoint(tmp_path):
    cfg = Phi2Config(**CFG, xattn=dict(every=2, context_dim=24, heads=2, ff=2.0))
    assert cfg.xattn == XAttnConfig(every=2, context_dim=24, heads=2, ff=2.0)
    assert Phi2Config.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    model = Phi2(cfg)
    open_gates(model)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "ckpt"))
    assert loaded.cfg == cfg
    idx, context = torch.randint(0, 256, (1, 6)), torch.randn(1, 3, 24)
    assert torch.equal(loaded(idx, context=context), model.eval()(idx, context=context))


@pytest.mark.parametrize("bad, message", [(dict(every=0), "every"), (dict(ff=-1), "ff"), (dict(width=3), "width")])
def test_bad_xattn_config_is_a_config_error(bad, message):
    with pytest.raises(ConfigError, match=message):
        Phi2Config(**CFG, xattn=bad)


def test_cached_context_generation_equals_uncached():
    torch.manual_seed(0)
    model = Phi2(Phi2Config(**CFG, xattn=XATTN)).eval()
    open_gates(model)
    idx, context = torch.randint(0, 256, (2, 7)), torch.randn(2, 5, 24)
    calls = []
    for block in model.layers:
        if block.xattn is not None:
            block.xattn.attn.kv.register_forward_hook(lambda *_: calls.append(1))
    cached = generate(model, idx, 12, context=context)
    assert len(calls) == 2  # one K/V projection per cross-attention layer for the whole sequence
    assert torch.equal(cached, generate_uncached(model, idx, 12, context=context))
    # and the context really steers the output
    assert not torch.equal(cached, generate(model, idx, 12, context=torch.randn(2, 5, 24)))


def test_resampler_gives_a_fixed_number_of_tokens():
    resampler = PerceiverResampler(ProjectorConfig(type="resampler", num_tokens=6, depth=2, heads=2), 40, 24)
    assert resampler(torch.randn(3, 17, 40)).shape == (3, 6, 24)
    assert resampler(torch.randn(3, 50, 40)).shape == (3, 6, 24)
