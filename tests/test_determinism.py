"""`deterministic: true` (issue 23, item 5): the flag reaches torch (deterministic algorithms, the cuBLAS workspace,
no cuDNN attention, the padded MoE path), is put back after the run, and two runs give identical losses."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from engine_helpers import CONFIG, losses, make_synthetic

from conftest import run_cli
from phiforge.model.moe import _grouped_mm_ok
from phiforge.train.determinism import CUBLAS_ENV, CUBLAS_WORKSPACE, deterministic_mode


def _nondeterministic_op():
    """put_ without accumulate: torch lists it among the ops that raise under deterministic algorithms (CPU too)."""
    torch.zeros(3).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]), accumulate=False)


def test_the_mode_sets_torchs_flags_and_puts_them_back(monkeypatch):
    monkeypatch.delenv(CUBLAS_ENV, raising=False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cuda.cudnn_sdp_enabled()
    with deterministic_mode(True) as now:
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()  # raise, not warn
        assert os.environ[CUBLAS_ENV] == CUBLAS_WORKSPACE == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not torch.backends.cuda.cudnn_sdp_enabled()  # cuDNN attention off; flash/efficient/math stay
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert now["algorithms"] and now["cublas_env"] == ":4096:8" and not now["cudnn_sdp"]
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            _nondeterministic_op()
    assert not torch.are_deterministic_algorithms_enabled() and CUBLAS_ENV not in os.environ
    assert torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cudnn.deterministic
    _nondeterministic_op()  # allowed again
    with deterministic_mode(False):
        assert not torch.are_deterministic_algorithms_enabled()
        _nondeterministic_op()


def test_a_users_cublas_setting_is_kept(monkeypatch):
    monkeypatch.setenv(CUBLAS_ENV, ":16:8")
    with deterministic_mode(True):
        assert os.environ[CUBLAS_ENV] == ":16:8"
    assert os.environ[CUBLAS_ENV] == ":16:8"


def test_moe_auto_leaves_grouped_mm_under_the_flag(monkeypatch):
    """On a (pretended) Hopper GPU in bf16, impl auto takes the grouped GEMM, but not in deterministic mode."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda_x = SimpleNamespace(is_cuda=True, device="cuda:0")
    assert _grouped_mm_ok(cuda_x, torch.bfloat16)
    with deterministic_mode(True):
        assert not _grouped_mm_ok(cuda_x, torch.bfloat16)


def test_two_deterministic_runs_give_identical_losses_with_the_flag_in_force(capsys, tmp_path, monkeypatch):
    """Two MoE runs with deterministic=true: the flag, the workspace variable and the SDPA choice are in force at
    every step (seen from inside the step), and the losses are equal bit for bit; afterwards all is put back."""
    from phiforge.train.pretrain import TextJob

    monkeypatch.delenv(CUBLAS_ENV, raising=False)
    data = make_synthetic(tmp_path / "data", train_docs=8, val_docs=2, doc_len=300)
    seen = []
    plain_loss = TextJob.loss

    def observed_loss(self, model, batch):
        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get(CUBLAS_ENV),
                     torch.backends.cuda.cudnn_sdp_enabled()))
        return plain_loss(self, model, batch)

    monkeypatch.setattr(TextJob, "loss", observed_loss)
    sets = ["max_steps=6", "save_interval=0", "eval_interval=100", "deterministic=true",
            "model.moe={num_experts: 4, top_k: 2}"]
    for name in ("a", "b"):
        args = [x for s in [f"data.dir={data}", f"out_dir={tmp_path / name}", *sets] for x in ("--set", s)]
        code, _, err = run_cli(capsys, "train", "--config", CONFIG, *args)
        assert code == 0, err
    assert len(seen) == 12 and set(seen) == {(True, CUBLAS_WORKSPACE, False)}
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == list(range(1, 7)) and a == b
    assert not torch.are_deterministic_algorithms_enabled() and CUBLAS_ENV not in os.environ


def test_warns_when_cuda_was_initialised_before_the_workspace_was_set(capsys, monkeypatch):
    monkeypatch.delenv(CUBLAS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with deterministic_mode(True):
        pass
    err = capsys.readouterr().err
    assert err.startswith("phiforge: warning: deterministic: CUDA was initialised before CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setenv(CUBLAS_ENV, ":4096:8")  # set by the user beforehand: nothing to say
    with deterministic_mode(True):
        pass
    assert capsys.readouterr().err == ""
