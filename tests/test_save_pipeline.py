"""The save pipeline (train/checkpointing.py): an async save holds the state of its step while training changes
the weights at once; the final model files split into per-rank shares; old checkpoints deleted without ever
leaving a half-deleted one that looks complete. In one process (a world of one); the multi-rank and kill -9
cases are in test_engine_resume.py and test_engine_parallel.py."""

from __future__ import annotations

import torch

from phiforge.model_files import read_latest
from phiforge.model import Phi2, Phi2Config
from phiforge.train.checkpointing import (Checkpointer, complete_checkpoints, prune, shard_plan, verify_checkpoint)

CFG = dict(vocab_size=512, n_layer=2, n_embd=64, n_head=4, intermediate_size=128, max_seq_len=64)


def _trained(seed: int) -> tuple[Phi2, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Phi2(Phi2Config(**CFG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 512, (2, 17))
    model(x[:, :-1], x[:, 1:]).loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_async_save_holds_its_steps_state_while_training_changes_the_weights(tmp_path):
    from phiforge.train.distributed import init_distributed, shutdown

    env = init_distributed("cpu")
    try:
        model, opt = _trained(0)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        run = tmp_path / "run"
        ckpt = Checkpointer(run, env, keep=2, async_save=True)
        state = {"step": 3, "tokens": 96, "world_size": 1, "model": model.cfg.to_dict()}
        ckpt.save(3, model, opt, state)
        assert ckpt.pending is not None and ckpt.pending.final.name == "step-00000003"  # written in the background
        with torch.no_grad():  # training goes on at once: the weights change while the save is being written
            for p in model.parameters():
                p.add_(1.0)
        ckpt.wait()
        assert read_latest(run) == run / "checkpoints" / "step-00000003" == ckpt.last_complete
        assert verify_checkpoint(ckpt.last_complete) is None
        twin, twin_opt = _trained(1)
        assert ckpt.load(ckpt.last_complete, twin, twin_opt, twin.cfg)["step"] == 3
        got = twin.state_dict()
        assert all(torch.equal(got[k], saved[k]) for k in saved)  # the state of step 3, not the changed weights
        ckpt.close()
    finally:
        shutdown(env)


def test_shard_plan_splits_whole_tensors_evenly_and_the_same_everywhere():
    specs = {f"w{i}": ((100 * (i + 1), 10), torch.float32) for i in range(7)} | {"b": ((10,), torch.bfloat16)}
    groups = shard_plan(specs, 3)
    assert sorted(k for g in groups for k in g) == sorted(specs)  # each tensor once, whole
    sizes = [sum(4000 * (int(k[1:]) + 1) if k != "b" else 20 for k in g) for g in groups]
    assert max(sizes) - min(sizes) <= 4000 * 7 // 2  # no share more than half the largest tensor off the others
    assert shard_plan(dict(reversed(specs.items())), 3) == groups  # the order the ranks list them in is no matter
    assert len(shard_plan(specs, 20)) == len(specs)  # more ranks than tensors: one tensor each, no empty files


def _fake_checkpoint(root, step: int):
    d = root / f"step-{step:08d}"
    d.mkdir(parents=True)
    for name in ("train_state.json", ".metadata", "__0_0.distcp"):
        (d / name).write_text("x")
    return d


def test_prune_keeps_the_newest_and_never_leaves_a_half_deleted_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    ckpts = [_fake_checkpoint(root, s) for s in (10, 20, 30, 40)]
    (root / "step-00000005.old").mkdir()  # what a kill in the middle of an earlier deletion leaves
    (root / "step-00000005.old" / "__0_0.distcp").write_text("x")
    prune(tmp_path, 2, newest=ckpts[-1])
    assert sorted(p.name for p in root.iterdir()) == ["step-00000030", "step-00000040"]
    # `newest` is kept even when it is not among the newest `keep` (a run resumed from an older checkpoint)
    prune(tmp_path, 1, newest=ckpts[2])
    assert complete_checkpoints(tmp_path) == ckpts[2:]


def test_async_saves_group_waits_as_long_as_the_runs_collectives(tmp_path, monkeypatch):
    """The async saves' own gloo group gets parallel.collective_timeout_s, not gloo's 30-minute default."""
    from datetime import timedelta

    import torch.distributed as dist

    from phiforge.train.distributed import init_distributed, shutdown

    made = []
    new_group = dist.new_group
    monkeypatch.setattr(dist, "new_group", lambda *a, **kw: made.append(kw) or new_group(*a, **kw))
    env = init_distributed("cpu")
    try:
        Checkpointer(tmp_path / "run", env, keep=2, async_save=True, collective_timeout_s=42).close()
    finally:
        shutdown(env)
    assert made == [{"backend": "gloo", "timeout": timedelta(seconds=42)}]
