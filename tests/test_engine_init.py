"""Meta-device initialisation (issue 14): the engine builds the model on the meta device, lays it out, then
fills each rank's shards. A fixed seed gives the same weights under none, DDP and FSDP2, `init_from` loads
straight into the shards, and a shard drawn alone equals the same rows of the whole tensor.
(2-rank FSDP2 from meta matching 1 rank's losses is tests/test_engine_parallel.py's first test: the engine has
no other way to build a model.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import ROOT, TIMEOUT, child_env

pytestmark = pytest.mark.slow  # multi-process or end-to-end: left out of the quick subset (-m "not slow")

WORKER = ROOT / "tests" / "init_weights_worker.py"


def _build(tmp_path, nproc: int, strategy: str, *extra) -> dict:
    out = tmp_path / f"{strategy}-{nproc}-{len(extra)}.safetensors"
    launch = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    p = subprocess.run([*launch, str(WORKER), str(out), strategy, *map(str, extra)], env=child_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    return load_file(str(out))


def test_fixed_seed_gives_the_same_weights_under_none_ddp_and_fsdp2(tmp_path):
    ref = _build(tmp_path, 1, "none")
    assert ref["layers.1.moe.w1"].abs().sum() > 0 and ref["layers.0.attn.qkv.weight"].std() > 0.01
    for nproc, strategy in ((2, "ddp"), (2, "fsdp")):
        got = _build(tmp_path, nproc, strategy)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), (strategy, k)


def test_init_from_loads_straight_into_fsdp_shards(tmp_path):
    from phiforge.model import Phi2, Phi2Config
    from phiforge.model_files import save_checkpoint

    torch.manual_seed(3)
    src = Phi2(Phi2Config.from_preset("tiny", moe={"num_experts": 4, "top_k": 2, "every": 2}))
    with torch.no_grad():  # make every tensor distinctive, biases and MoE output projections included
        for p in src.parameters():
            p.add_(torch.randn(p.shape) * 0.01)
    save_checkpoint(src, tmp_path / "ckpt")
    got = _build(tmp_path, 2, "fsdp", tmp_path / "ckpt")
    for k, v in src.state_dict().items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("rows", [1, 7, 13])
def test_a_shard_drawn_alone_equals_those_rows_of_the_whole_tensor(rows):
    from phiforge.model.init import BLOCK_VALUES, Init, fill_rows_

    shape = (rows, BLOCK_VALUES // 5 + 1)  # blocks of 4 rows: shards cut through them
    whole = torch.empty(shape)
    fill_rows_(whole, shape, 0, Init("normal", 0.02), seed=5, name="w")
    assert whole.std() == pytest.approx(0.02, rel=0.05)
    for world in (2, 3):
        chunk = -(-rows // world)
        for r in range(world):
            lo, hi = r * chunk, min(rows, (r + 1) * chunk)
            part = torch.empty((max(0, hi - lo), shape[1]))
            fill_rows_(part, shape, lo, Init("normal", 0.02), seed=5, name="w")
            assert torch.equal(part, whole[lo:hi])
    other = torch.empty(shape)
    fill_rows_(other, shape, 0, Init("normal", 0.02), seed=6, name="w")
    assert not torch.equal(other, whole)  # the seed matters
