"""`phiforge plan` against measured CPU peaks (issue 4), the shipped configs, and the MFU formula / peak table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phiforge.config import load_config
from phiforge.train.config import TrainConfig

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
# 5.3M parameters, d=256, V=4096, 1024 tokens per micro-batch: weights, optimizer state, activations and the
# loss's logits all matter, so a wrong term in any of them shows.
MEASURED = ["model.vocab_size=4096", "model.n_layer=4", "model.n_embd=256", "model.n_head=4",
            "model.intermediate_size=1024", "model.rotary_pct=0.5", "model.max_seq_len=256", "data.seq_len=128",
            "micro_batch_size=8", "precision=fp32", "threads=1"]


@pytest.mark.parametrize("sets,world", [
    ([], 1),
    (["parallel.activation_checkpointing=full"], 1),
    (["parallel.activation_checkpointing=selective", "parallel.ac_policy=op"], 1),
    (["micro_batch_size=1", "data.seq_len=32"], 1),  # weight-dominated: the peak is the optimizer step
    (["parallel.strategy=fsdp"], 2),
    (["parallel.strategy=fsdp", "precision=bf16-mixed", "parallel.activation_checkpointing=full"], 2),
    (["precision=bf16-mixed"], 1),  # FSDP2's casts on a 1-rank mesh: the GPU default on one device
    (["optim.name=muon", "micro_batch_size=1", "data.seq_len=32"], 1),  # one momentum for the matrices
    (["optim.name=muon", "parallel.strategy=fsdp"], 2),  # + the gathered matrices of the Muon step
], ids=["none", "full", "selective-op", "tiny-batch", "fsdp2", "fsdp2-bf16-full", "bf16-mixed", "muon-tiny-batch",
     "muon-fsdp2"])
def test_plan_within_15_percent_of_measured_cpu_peak(sets, world):
    from phiforge.train.plan import cpu_plan, measure_cpu_peak

    cfg = load_config(TrainConfig, None, MEASURED + sets)
    predicted = cpu_plan(cfg, world).peak_bytes
    measured = max(measure_cpu_peak(cfg, world, steps=3))  # peak live tensor bytes of the busiest rank
    assert abs(predicted / measured - 1) < 0.15, (predicted / 2**20, measured / 2**20)


def test_plan_cli_phi2_configs(capsys):
    code, out, err = run_cli(capsys, "plan", "--config", ROOT / "configs" / "phi2-8xh100.yaml", "--gpus", 8,
                             "--gpu-mem", 79.1)
    assert code == 0, err
    assert "fsdp on 8 GPU(s)" in out and "largest micro_batch_size that fits: 8" in out
    code, out, err = run_cli(capsys, "plan", "--config", ROOT / "configs" / "phi2-1xh100.yaml", "--gpus", 1,
                             "--gpu-mem", 79.1, "--json")
    assert code == 0, err
    plan = json.loads(out)
    # bf16-mixed on 1 GPU: FSDP2's bf16 copies of the block in use (no autocast copy of every weight)
    assert plan["params"] == 2_779_683_840 and plan["max_micro_batch_size"] == 5
    assert plan["components_gib"]["parameters"] == pytest.approx(2_779_683_840 * 4 / 2**30)
    # every shipped GPU config fits at its own micro-batch, as docs/training.md says
    from phiforge.train.plan import plan_memory, usable_bytes

    for name, gpus in (("phi2-1xh100", 1), ("phi2-8xh100", 8), ("phi2-multinode", 32)):
        cfg = load_config(TrainConfig, ROOT / "configs" / f"{name}.yaml")
        assert plan_memory(cfg, gpus).peak_bytes < usable_bytes(79.1), name
    code, _, err = run_cli(capsys, "plan", "--config", ROOT / "configs" / "phi2-8xh100.yaml", "--gpus", 0)
    assert code == 1 and "--gpus" in err


def test_plan_states_start_up_memory_per_rank(capsys):
    """Issue 14: after meta-device init a rank holds its parameter shard on the device and, on the host, one
    block of 2^20 values being drawn (init_from: its slice of the largest tensor, the embedding)."""
    code, out, err = run_cli(capsys, "plan", "--config", ROOT / "configs" / "phi2-8xh100.yaml", "--gpus", 8, "--json")
    assert code == 0, err
    startup = json.loads(out)["startup_gib"]
    assert startup["device"] == pytest.approx(2_779_683_840 * 4 / 8 / 2**30)
    assert startup["host"] == pytest.approx(4 / 1024)
    code, out, err = run_cli(capsys, "plan", "--config", ROOT / "configs" / "phi2-8xh100.yaml", "--gpus", 8,
                             "--set", "init_from=ckpt")
    assert code == 0, err
    assert "at start-up, per rank" in out and "device 1.29 GiB, host 62.50 MiB" in out  # 51200 x 2560 x 4 / 8


def test_docs_hold_the_current_phi2_predictions():
    from phiforge.train.plan import max_micro_batch, plan_memory

    doc = (ROOT / "docs" / "training.md").read_text()
    for name, gpus in (("phi2-1xh100", 1), ("phi2-8xh100", 8)):
        cfg = load_config(TrainConfig, ROOT / "configs" / f"{name}.yaml")
        peak = plan_memory(cfg, gpus).peak_bytes / 2**30
        assert f"{peak:.1f} GiB" in doc, (name, peak)
        assert f"| {max_micro_batch(cfg, gpus, 79.1)} |" in doc, name


def test_mfu_formula_and_peak_table(monkeypatch):
    from phiforge.model import Phi2, Phi2Config
    from phiforge.train import metrics

    with torch.device("meta"):
        phi2 = Phi2(Phi2Config.from_preset("phi-2"))
    n = metrics.matmul_params(phi2)
    assert n == 2_779_683_840 - 51200 * 2560  # everything but the input embedding
    assert metrics.flops_per_token(n, 32, 2560, 2048) / 1e9 == pytest.approx(17.90, abs=0.005)  # ANCHORS.md
    assert metrics.peak_flops(torch.device("cpu")) == (None, "no MFU on cpu")
    for name, tflops in [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                         ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.05),
                         ("NVIDIA L40", 181.05), ("NVIDIA L4", 121.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None, n=name: n)
        peak, label = metrics.peak_flops(torch.device("cuda", 0))
        assert peak == pytest.approx(tflops * 1e12), name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Mystery GPU 9000")
    assert metrics.peak_flops(torch.device("cuda", 0))[0] is None
    assert metrics.peak_flops(torch.device("cuda", 0), override_tflops=100)[0] == 1e14
    # MoE: only top_k of num_experts routed experts count
    moe = Phi2(Phi2Config.from_preset("tiny", moe={"num_experts": 4, "top_k": 1}))
    dense = Phi2(Phi2Config.from_preset("tiny"))
    experts = sum(p.numel() for m in moe.moe_layers().values() for k, p in m.named_parameters()
                  if k in ("w1", "b1", "w2", "b2"))
    assert metrics.matmul_params(moe) == moe.num_params() - 4096 * 80 - experts * 3 // 4
    assert metrics.matmul_params(dense) < metrics.matmul_params(moe)


def test_metric_sinks_jsonl_wandb_and_tensorboard(tmp_path, monkeypatch):
    """JSONL always; W&B through its public API when installed and wandb_project is set (a stand-in module here);
    nothing at all on ranks other than 0."""
    import sys
    import types

    from phiforge.train.metrics import Sinks

    logged = []
    fake = types.ModuleType("wandb")
    run = types.SimpleNamespace(log=lambda d, step: logged.append((step, d)), finish=lambda: logged.append("finish"))
    fake.init = lambda **kw: run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    s = Sinks(tmp_path, True, tensorboard=False, wandb_project="p")
    s.write(event="train", step=3, loss=2.5, lr=1e-3, grad_norm=float("nan"), peak_mem_kind="rss_peak")
    s.write(event="start", params=10)
    s.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["loss"] == 2.5
    assert logged == [(3, {"train/loss": 2.5, "train/lr": 1e-3}), "finish"]  # non-finite and text values left out
    off = Sinks(tmp_path / "r1", False)
    off.write(event="train", step=1, loss=1.0)
    off.close()
    assert not (tmp_path / "r1").exists()


def test_tensorboard_sink_when_installed(tmp_path):
    import tensorboard  # noqa: F401  the `tensorboard` extra, which `make test` installs
    from phiforge.train.metrics import Sinks

    s = Sinks(tmp_path / "tb", True)
    s.write(event="train", step=1, loss=1.0)
    s.close()
    assert list((tmp_path / "tb" / "tensorboard").iterdir())


def test_cpu_peak_memory_is_the_process_high_water_mark():
    """peak_memory on a CPU is VmHWM in GiB: after touching 256 MiB it covers the resident set at that moment."""
    from phiforge.train.metrics import peak_memory

    def resident_bytes() -> int:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) * 1024

    before = resident_bytes()
    block = torch.ones(64 * 2**20)  # 256 MiB, every page written
    now = resident_bytes()
    fields = peak_memory(torch.device("cpu"))
    peak = fields["peak_mem_gib"]
    assert fields["peak_mem_kind"] == "rss_peak"
    assert now - before >= 250 * 2**20
    assert now <= peak * 2**30 < now + 64 * 2**30  # in GiB, and no more than this machine could hold
    del block
