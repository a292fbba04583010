"""Bad checkpoints fail as one clear line: nonzero exit, `phiforge: error: ...` naming the problem, no traceback.

`convert to-hf` loads a phiforge checkpoint and `convert from-hf` a Hugging Face one, so they exercise both
readers. HF-format inputs are written with phiforge's own helpers: these tests do not need transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from phiforge.cli import main
from phiforge.errors import CheckpointError
from phiforge.hf import config_from_hf, config_to_hf, state_dict_to_hf
from phiforge.model import Phi2, Phi2Config
from phiforge.model_files import load_state_dict, save_checkpoint, save_state_dict

CFG = dict(vocab_size=256, n_layer=2, n_embd=32, n_head=2, intermediate_size=64, max_seq_len=64)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(Phi2(Phi2Config(**CFG)), tmp_path / "ckpt")


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    cfg = Phi2Config(**CFG)
    torch.manual_seed(0)
    d = tmp_path / "hf"
    save_state_dict(state_dict_to_hf(Phi2(cfg).state_dict(), cfg), d)
    (d / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    return d


def rewrite_weights(d: Path, edit) -> None:
    state = load_state_dict(d)
    edit(state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def fails(capsys, args: list[str], *needles: str) -> str:
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("phiforge: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------------------------------------
# phiforge checkpoints (read by `convert to-hf`)


def test_missing_checkpoint_dir(tmp_path, capsys):
    fails(capsys, ["convert", "to-hf", tmp_path / "nope", tmp_path / "out"], "not found", "nope")


def test_corrupt_config(ckpt, tmp_path, capsys):
    (ckpt / "config.json").write_text('{"format": "phiforge", "model": {')
    fails(capsys, ["convert", "to-hf", ckpt, tmp_path / "out"], "not valid JSON", "config.json")


@pytest.mark.parametrize("damage", [lambda b: os.urandom(4096), lambda b: b[: len(b) // 2]],
                         ids=["garbage", "truncated"])
def test_corrupt_safetensors(ckpt, tmp_path, capsys, damage):
    f = ckpt / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    fails(capsys, ["convert", "to-hf", ckpt, tmp_path / "out"], "corrupt safetensors", "model.safetensors")
    assert not (tmp_path / "out").exists()


def test_missing_tensor(ckpt, tmp_path, capsys):
    rewrite_weights(ckpt, lambda s: s.pop("layers.1.mlp.fc2.bias"))
    fails(capsys, ["convert", "to-hf", ckpt, tmp_path / "out"], "missing layers.1.mlp.fc2.bias")


def test_extra_tensor(ckpt, tmp_path, capsys):
    rewrite_weights(ckpt, lambda s: s.update({"layers.0.attn.rogue.weight": torch.zeros(2)}))
    fails(capsys, ["convert", "to-hf", ckpt, tmp_path / "out"], "unexpected layers.0.attn.rogue.weight")


def test_wrong_shape(ckpt, tmp_path, capsys):
    rewrite_weights(ckpt, lambda s: s.update({"layers.0.attn.qkv.weight": torch.zeros(96, 16)}))
    fails(capsys, ["convert", "to-hf", ckpt, tmp_path / "out"], "wrong shape for layers.0.attn.qkv.weight", "(96, 16)")


def test_unrepresentable_field_is_refused(ckpt, tmp_path, capsys):
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["moe"] = {"num_experts": 8, "top_k": 2}
    (ckpt / "config.json").write_text(json.dumps(meta))
    fails(capsys, ["convert", "to-hf", ckpt, tmp_path / "out"], "moe", "Hugging Face")


def test_config_to_hf_refuses_any_unmapped_extension_field():
    # stands in for a future Phi2Config with, e.g., cross-attention options
    Ext = dataclasses.make_dataclass("Ext", [("xattn", dict | None, None), ("xattn_every", int, 0)],
                                     bases=(Phi2Config,))
    config_to_hf(Ext(**CFG))  # extensions off: fine
    with pytest.raises(CheckpointError, match="xattn_every"):
        config_to_hf(Ext(**CFG, xattn_every=4))
    with pytest.raises(CheckpointError, match="xattn"):
        config_to_hf(Ext(**CFG, xattn={"every": 4}))


def test_error_without_traceback_in_a_real_process(ckpt, tmp_path):
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    p = subprocess.run([sys.executable, "-m", "phiforge", "convert", "to-hf", str(ckpt), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert p.stderr.startswith("phiforge: error: corrupt safetensors file") and len(p.stderr.splitlines()) == 1
    assert "Traceback" not in p.stderr + p.stdout


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints (read by `convert from-hf`)


def test_hf_missing_dir(tmp_path, capsys):
    fails(capsys, ["convert", "from-hf", tmp_path / "nope", tmp_path / "out"], "not found", "nope")


def test_hf_corrupt_config(hf_dir, tmp_path, capsys):
    (hf_dir / "config.json").write_text("not json")
    fails(capsys, ["convert", "from-hf", hf_dir, tmp_path / "out"], "not valid JSON")


def test_hf_missing_config(hf_dir, tmp_path, capsys):
    (hf_dir / "config.json").unlink()
    fails(capsys, ["convert", "from-hf", hf_dir, tmp_path / "out"], "config not found")


def test_hf_not_phi(hf_dir, tmp_path, capsys):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    fails(capsys, ["convert", "from-hf", hf_dir, tmp_path / "out"], "model_type 'llama'", "expected 'phi'")


def test_hf_missing_weights(hf_dir, tmp_path, capsys):
    (hf_dir / "model.safetensors").unlink()
    fails(capsys, ["convert", "from-hf", hf_dir, tmp_path / "out"], "no model.safetensors")


def test_hf_missing_tensor_is_named_by_its_hf_key(hf_dir, tmp_path, capsys):
    rewrite_weights(hf_dir, lambda s: s.pop("model.layers.1.self_attn.k_proj.weight"))
    fails(capsys, ["convert", "from-hf", hf_dir, tmp_path / "out"], "missing model.layers.1.self_attn.k_proj.weight")


def test_hf_vocab_mismatch(hf_dir, tmp_path, capsys):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "vocab_size": 300}))
    fails(capsys, ["convert", "from-hf", hf_dir, tmp_path / "out"], "wrong shape for lm_head.bias: (256,) in file, (300,) in model")


@pytest.mark.parametrize("key, value, needle", [
    ("hidden_act", "relu", "hidden_act 'relu'"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling"),
    ("num_key_value_heads", 3, "n_kv_head"),
])
def test_hf_config_we_cannot_reproduce(key, value, needle):
    cfg = config_to_hf(Phi2Config(**CFG))
    with pytest.raises(CheckpointError, match=needle):
        config_from_hf({**cfg, key: value})


def test_hf_config_keeps_vocab_unpadded():
    cfg = config_from_hf({**config_to_hf(Phi2Config(**CFG)), "vocab_size": 1000})
    assert cfg.vocab_size == 1000


def test_bad_shard_size_is_a_usage_error(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "to-hf", str(ckpt), str(tmp_path / "out"), "--max-shard-size", "5XB"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "bad size '5XB'" in err


# ---------------------------------------------------------------------------------------------
# issue 21: crafted files (items 10, 11, 12) and files naming other files (item 11, item 14's examples)


class _Touch:
    """Unpickled by code that trusts the file, it creates `path`: the tests assert it never exists."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def engine_state(model, optimizer) -> dict:
    """The state dict the training engine saves and loads with DCP."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def dcp_checkpoint(d: Path) -> Path:
    """A training checkpoint as the engine writes it (DCP model + AdamW state, train_state.json), in-process."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = Phi2(Phi2Config(**CFG))
    sd = engine_state(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    dcp.save(sd, checkpoint_id=str(d), no_dist=True)
    (d / "train_state.json").write_text(json.dumps({"format": "phiforge-train-state", "version": 1, "step": 1,
                                                    "tokens": 64, "world_size": 1, "model": model.cfg.to_dict()}))
    return d


def rewrite_storage(ckpt: Path, edit) -> None:
    """Re-pickle ckpt's DCP metadata after edit(metadata): classes DCP writes only, as an attacker could."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(ckpt)).read_metadata()
    edit(meta)
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))


def test_crafted_dcp_metadata_runs_no_code_under_consolidate(capsys, tmp_path):
    """Item 10: `.metadata` is a pickle; `checkpoint consolidate` unpickled it with pickle.load."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader

    ckpt = dcp_checkpoint(tmp_path / "run" / "step-1")
    pwned = tmp_path / "PWNED"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Touch(pwned)))
    with pytest.raises(AttributeError):  # what DCP itself does with it: run the payload, then fail on its result
        FileSystemReader(str(ckpt)).read_metadata()
    assert pwned.exists()
    pwned.unlink()
    fails(capsys, ["checkpoint", "consolidate", ckpt, tmp_path / "out"],
          f"refusing DCP metadata {ckpt / '.metadata'}: it refers to posix.system, which DCP never writes there",
          "phiforge never runs code a checkpoint carries")
    assert not pwned.exists() and not (tmp_path / "out").exists()
    # setting attributes of a class DCP does write (rather than building an instance) is refused too
    (ckpt / ".metadata").write_bytes(b"ctorch.distributed.checkpoint.metadata\nMetadata\n(dS'load_bytes'\nI1\nsb.")
    fails(capsys, ["checkpoint", "consolidate", ckpt, tmp_path / "out"],
          "refusing DCP metadata", "it sets the state of type Metadata, which DCP never does")
    (ckpt / ".metadata").write_bytes(b"\x80\x04\x95")  # truncated
    fails(capsys, ["checkpoint", "consolidate", ckpt, tmp_path / "out"], f"DCP metadata {ckpt / '.metadata'} is "
                                                                         "damaged")


def test_dcp_data_file_outside_the_checkpoint_is_not_read(capsys, tmp_path):
    """Item 11 for DCP: `.metadata` names the file each tensor is in; one outside the checkpoint is refused."""
    ckpt = dcp_checkpoint(tmp_path / "run" / "step-1")
    (ckpt / "__0_0.distcp").rename(tmp_path / "run" / "outside.distcp")  # following the name would succeed

    def outside(meta):
        for info in meta.storage_data.values():
            info.relative_path = "../outside.distcp"

    rewrite_storage(ckpt, outside)
    fails(capsys, ["checkpoint", "consolidate", ckpt, tmp_path / "out"],
          f"DCP metadata {ckpt / '.metadata'} is not one DCP wrote: it names a data file outside the checkpoint: "
          "'../outside.distcp'")
    assert not (tmp_path / "out").exists()


def test_crafted_optimizer_item_runs_no_code_on_resume(tmp_path):
    """Item 10 on resume: DCP's default planner reads non-tensor items (the optimizer's lr, betas, ...) with
    torch.load(weights_only=False), so a crafted data file ran code even with honest-looking metadata."""
    import torch.distributed.checkpoint as dcp

    from phiforge.train.dcp_reader import load_dcp

    ckpt = dcp_checkpoint(tmp_path / "step-1")
    pwned = tmp_path / "PWNED"
    payload = tmp_path / "payload.pt"
    torch.save(_Touch(pwned), payload)
    (ckpt / "__1_0.distcp").write_bytes(payload.read_bytes())

    def crafted(meta):
        for index, info in meta.storage_data.items():
            if index.fqn == "optim.param_groups.0.lr":
                info.relative_path, info.offset, info.length = "__1_0.distcp", 0, payload.stat().st_size

    rewrite_storage(ckpt, crafted)
    model = Phi2(Phi2Config(**CFG))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sd = engine_state(model, optimizer)
    dcp.load(sd, checkpoint_id=str(ckpt), no_dist=True)  # DCP's own load runs the payload; lr is its exit status
    assert pwned.exists() and sd["optim"]["param_groups"][0]["lr"] == 0
    pwned.unlink()
    with pytest.raises(CheckpointError, match=r"refusing item optim\.param_groups\.0\.lr of DCP checkpoint .*"
                                              r"step-1: it holds more than tensors .*posix\.system"):
        load_dcp(engine_state(model, optimizer), ckpt, no_dist=True)
    assert not pwned.exists()


@pytest.mark.slow
def test_crafted_metadata_is_refused_by_train_resume(tmp_path):
    """Item 10 through the engine: `train --resume CKPT` reads DCP through the same checked reader."""
    import pickle

    from engine_helpers import make_synthetic, run_train

    data = make_synthetic(tmp_path / "data", train_docs=8, val_docs=2, doc_len=200)
    run_train(1, data, tmp_path / "run", "max_steps=2", "save_interval=2", "eval_interval=2")
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    pwned = tmp_path / "PWNED"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Touch(pwned)))
    files = json.loads((ckpt / "files.json").read_text())  # an attacker keeps the size list consistent
    files["files"][".metadata"] = (ckpt / ".metadata").stat().st_size
    (ckpt / "files.json").write_text(json.dumps(files))
    p = run_train(1, data, tmp_path / "run2", "max_steps=4", resume=str(ckpt), check=False)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode != 0 and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"phiforge: error: refusing DCP metadata {ckpt / '.metadata'}: it refers to "
                               "posix.system"), p.stderr
    assert not pwned.exists()


def test_safetensors_index_entries_outside_the_checkpoint_are_not_read(ckpt, tmp_path, capsys):
    """Item 11: weight_map values with ../ or an absolute path were opened."""
    (ckpt / "model.safetensors").rename(tmp_path / "outside.safetensors")  # following the entry would succeed
    keys = list(load_state_dict_file(tmp_path / "outside.safetensors"))
    for entry in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: entry for k in keys}}))
        fails(capsys, ["convert", "to-hf", ckpt, tmp_path / "out"],
              f"safetensors index {ckpt / 'model.safetensors.index.json'} names a weight file outside its folder: "
              f"{entry!r}")
        assert not (tmp_path / "out").exists()


def load_state_dict_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_latest_naming_a_path_outside_the_run_is_not_followed(ckpt, tmp_path, capsys):
    """Item 11: generate followed `latest` holding ../.. or an absolute path (and item 14: a `latest` that is not
    UTF-8, or is a folder or a link, gave a Python error)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("RECOGNISABLE SECRET")
    for content, needle in (("../../ckpt", "holds '../../ckpt', not the name of a checkpoint in"),
                            (str(ckpt), f"holds {str(ckpt)!r}, not the name of a checkpoint"),
                            (b"step-\xff\xfe", "is not UTF-8 text")):
        latest = run / "latest"
        latest.write_bytes(content if isinstance(content, bytes) else content.encode())
        out = fails(capsys, ["generate", "--checkpoint", run, "--prompt", "hi", "--max-new-tokens", "2"],
                    f"{latest} ", needle)
        assert "RECOGNISABLE" not in out
    (run / "latest").unlink()
    (run / "latest").symlink_to(secret)
    out = fails(capsys, ["generate", "--checkpoint", run, "--prompt", "hi"], f"{run / 'latest'} is a link")
    assert "RECOGNISABLE" not in out
    (run / "latest").unlink()
    (run / "latest").mkdir()
    fails(capsys, ["generate", "--checkpoint", run, "--prompt", "hi"], f"{run / 'latest'} is not a file")


@pytest.mark.parametrize("content, needle", [
    ("[1, 2]", "checkpoint config CKPT/config.json must hold a JSON object ({...}), not an array"),
    ('{"format": "phiforge", "format_version": "2", "model": {}}',
     "CKPT/config.json: 'format_version' must be an integer, got '2'"),
])
def test_config_json_of_the_wrong_shape(ckpt, tmp_path, capsys, content, needle):
    """Item 14: a config.json that is a list, or `format_version: "2"`, was a TypeError/AttributeError."""
    (ckpt / "config.json").write_text(content)
    fails(capsys, ["generate", "--checkpoint", ckpt, "--prompt", "hi"], needle.replace("CKPT", str(ckpt)))


def test_files_json_naming_a_file_outside_the_checkpoint(tmp_path):
    """Item 11: files.json's sizes were checked by following its names (and so probed files outside)."""
    from phiforge.train.checkpointing import verify_checkpoint

    ckpt = dcp_checkpoint(tmp_path / "step-1")
    (tmp_path / "secret.txt").write_text("x")
    (ckpt / "files.json").write_text(json.dumps({"files": {"../secret.txt": 1}}))
    assert verify_checkpoint(ckpt) == "files.json names a file outside the checkpoint: '../secret.txt'"


def test_crafted_tokenizer_regex_is_one_line_naming_the_file(ckpt, capfd):
    """Item 12: a pre-tokenizer regex that backtracks without end panicked in Rust: a 3-line report on stderr (a
    60-line one under RUST_BACKTRACE=1) and a Python-level PanicException."""
    from phiforge.tokenizer import builtin_tokenizer

    tok = json.loads(builtin_tokenizer().to_str())
    tok["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+b"}, "behavior": "Isolated",
                            "invert": False}
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    os.environ["RUST_BACKTRACE"], old = "1", os.environ.get("RUST_BACKTRACE")
    try:
        code = main(["generate", "--checkpoint", str(ckpt), "--prompt", "a" * 28 + "c", "--max-new-tokens", "2"])
    finally:
        os.environ.pop("RUST_BACKTRACE") if old is None else os.environ.__setitem__("RUST_BACKTRACE", old)
    out, err = capfd.readouterr()  # file descriptors 1 and 2: what the Rust library writes too
    assert code != 0 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"phiforge: error: bad tokenizer {ckpt / 'tokenizer.json'}: the tokenizers library failed on "
                     "this input (Onig: Regex search error: retry-limit-in-match over); replace the file with a "
                     "working tokenizer.json"], err
