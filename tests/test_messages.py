"""Issue 21, items 13-15: inputs the user can fix (or a machine that ran out of disk or memory) give one line that
names the value or file and what is wrong, never a traceback or a Python exception's name; the error handler
itself survives what it reports. Each test here is named in docs/errors.md, "Messages (round 3)"."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from engine_helpers import CONFIG, make_synthetic
from phiforge.errors import ConfigError

from conftest import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("messages") / "synthetic")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A text checkpoint with a 32-token context (GPT-2's tokenizer)."""
    from phiforge.model import Phi2, Phi2Config
    from phiforge.model_files import save_checkpoint

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt") / "CKPT"
    save_checkpoint(Phi2(Phi2Config(n_layer=1, n_embd=16, n_head=2, intermediate_size=32, max_seq_len=32,
                                    rotary_pct=0.5)), out)
    return out


def checksums(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*"))
            if f.is_file()}


def train(capsys, data: Path, run: Path, *sets: str, resume: str | None = None):
    argv = ["train", "--config", CONFIG, "--set", f"data.dir={data}", "--set", f"out_dir={run}"]
    for s in sets:
        argv += ["--set", s]
    return run_cli(capsys, *argv, *(["--resume", resume] if resume else []))


# ---------------------------------------------------------------------------------------------
# 13: tracebacks on the console


def test_non_utf8_prompt_is_one_line_error(ckpt, capsys):
    code, out, err = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "caf\udce9")
    assert_one_line_error(code, err)
    assert err.strip() == ("phiforge: error: --prompt 'caf\\xe9' is not valid UTF-8 text (byte 0xe9); phiforge takes "
                           "its arguments as UTF-8: check the terminal's encoding (or rename a file whose name is not "
                           "UTF-8)")
    assert out == ""


@pytest.mark.parametrize("argv", [
    ["generate", "--checkpoint", "CKPT", "--prompt=caf\udce9"],
    ["vision", "generate", "--checkpoint", "CKPT", "--image", "x.png", "--prompt", "caf\udce9"],
    ["eval", "--checkpoint", "CKPT", "--text", "t\udce9.txt"],
    ["train", "--config", str(CONFIG), "--set", "out_dir=run\udce9"],
    ["vision", "synth", "--out", "s\udce9", "--n", "4"],
    ["tokenizer", "train", "--source", "bundled", "--out", "tok", "--text-key", "\udce9"],
])
def test_non_utf8_argument_of_any_command_is_one_line_error(argv, ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(ckpt) if a == "CKPT" else a for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "is not valid UTF-8 text (byte 0xe9)")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_non_utf8_bytes_from_a_real_command_line(ckpt, tmp_path):
    """The same through a real argv (bytes decoded by Python with surrogateescape) and a real stderr."""
    p = subprocess.run([sys.executable, "-m", "phiforge", "generate", "--checkpoint", str(ckpt), "--prompt",
                        b"caf\xe9"], capture_output=True, cwd=tmp_path, env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert p.returncode == 1 and p.stdout == b""
    assert p.stderr.decode() == ("phiforge: error: --prompt 'caf\\xe9' is not valid UTF-8 text (byte 0xe9); phiforge "
                                 "takes its arguments as UTF-8: check the terminal's encoding (or rename a file "
                                 "whose name is not UTF-8)\n")


def test_error_handler_survives_surrogates_in_an_unexpected_error(tmp_path, capsys, monkeypatch):
    """A bug whose message holds undecodable bytes (a file name found on disk) still gets its one line and its
    traceback file."""
    from phiforge import cli, tracebacks

    def bug(args):
        raise RuntimeError("cannot handle file na\udcefme.txt")

    monkeypatch.setattr(cli, "build_parser", _parser_running(bug))
    monkeypatch.setattr(tracebacks, "_error_dir", tmp_path / "run" / "errors")
    code, _, err = run_cli(capsys, "anything")
    report = tmp_path / "run" / "errors" / "rank-0.txt"
    assert_one_line_error(code, err)
    assert err.strip() == (f"phiforge: error: RuntimeError: cannot handle file na\\xefme.txt (rank 0; traceback in "
                           f"{report}; --debug prints it)")
    assert "cannot handle file na\\udcefme.txt" in report.read_text(encoding="utf-8")


def test_traceback_file_falls_back_to_the_temporary_directory(tmp_path, capsys, monkeypatch):
    """RUN/errors cannot be written (here: RUN is a file; on a full disk the write fails alike): the traceback
    goes to the temporary directory and the line says both; when that fails too, the line says so."""
    import tempfile

    from phiforge import cli, tracebacks

    def bug(args):
        raise RuntimeError("a bug")

    (tmp_path / "run").write_text("not a directory")
    monkeypatch.setattr(cli, "build_parser", _parser_running(bug))
    monkeypatch.setattr(tracebacks, "_error_dir", tmp_path / "run" / "errors")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    code, _, err = run_cli(capsys, "anything")
    assert_one_line_error(code, err)
    (report,) = (tmp_path / "tmp" / "phiforge-errors").iterdir()
    assert "RuntimeError: a bug" in report.read_text()
    assert err.strip() == (f"phiforge: error: RuntimeError: a bug (rank 0; traceback in {report}; cannot write "
                           f"{tmp_path / 'run' / 'errors' / 'rank-0.txt'}: Not a directory; --debug prints it)")
    (tmp_path / "tmp2").write_text("not a directory either")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp2"))
    code, _, err = run_cli(capsys, "anything")
    assert_one_line_error(code, err, "(rank 0; no traceback file; cannot write", "; --debug prints it)")


def _parser_running(func):
    """A build_parser whose only command runs func (for driving the CLI's error handling)."""
    import argparse

    def build():
        p = argparse.ArgumentParser(prog="phiforge")
        p.add_argument("command")
        p.set_defaults(func=func)
        return p

    return build


@contextmanager
def _disk_full_in(step_dir: str):
    """DCP's file writes into `step_dir` fail as on a full disk (ENOSPC from the write, after the file exists)."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    real = FileSystem.create_stream

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)

        def __getattr__(self, name):
            return getattr(self.f, name)

    @contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as f:
            yield Full(f) if step_dir in str(path) and "w" in mode else f

    FileSystem.create_stream = create_stream
    try:
        yield
    finally:
        FileSystem.create_stream = real


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(data, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = train(capsys, data, run, "max_steps=2", "save_interval=2", "eval_interval=2")
    assert code == 0, err
    before = checksums(run / "checkpoints" / "step-00000002")
    with _disk_full_in("step-00000004.tmp"):
        code, _, err = train(capsys, data, run, "max_steps=6", "save_interval=2", "eval_interval=2",
                             resume="auto")
    assert_one_line_error(code, err)
    assert err.strip() == (f"phiforge: error: no space left on device while saving checkpoint step-00000004 in {run} "
                           "(No space left on device); the previous checkpoint step-00000002 is intact (free some "
                           "space, then --resume auto)")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]  # the partial save is gone
    assert checksums(run / "checkpoints" / "step-00000002") == before
    assert (run / "latest").read_text().strip() == "step-00000002"
    assert not (run / "errors" / "rank-0.txt").exists()  # the user's problem: no traceback file
    code, _, err = train(capsys, data, run, "max_steps=4", "save_interval=2", "eval_interval=2", resume="auto")
    assert code == 0, err  # the checkpoint the message named resumes
    assert (run / "latest").read_text().strip() == "step-00000004"


def test_full_disk_outside_a_save_is_one_line(tmp_path, capsys, monkeypatch):
    """ENOSPC anywhere else (here: writing an output file of `vision synth`) is one line naming the file."""
    from phiforge.vision import synth

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/images/000000.png")

    monkeypatch.setattr(synth, "_write", full)
    code, _, err = run_cli(capsys, "vision", "synth", "--out", tmp_path / "s", "--n", "4")
    assert_one_line_error(code, err)
    assert err.strip() == ("phiforge: error: no space left on device writing /data/out/images/000000.png (No space "
                           "left on device): free some space and run the command again")
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------------
# 14: values the user can fix, and a machine out of memory


def test_seed_beyond_64_bits_is_one_line_for_every_command(ckpt, tmp_path, capsys):
    big = str(10**26)
    for argv in (["generate", "--checkpoint", ckpt, "--prompt", "hi", "--seed", big],
                 ["vision", "synth", "--out", tmp_path / "s", "--n", "4", "--seed", big],
                 ["convert", "upcycle", ckpt, tmp_path / "u", "--moe", "num_experts=2,top_k=1", "--seed", big],
                 ["eval", "--checkpoint", ckpt, "--text", tmp_path / "t.txt", "--seed", big],
                 ["eval", "make-cloze", "--data", tmp_path / "d", "--out", tmp_path / "c.jsonl", "--seed", big],
                 ["litgpt", "prepare", "--from-dataset", tmp_path / "d", "--out", tmp_path / "l", "--seq-len", "8",
                  "--seed", big]):
        code, out, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err)
        assert err.strip() == f"phiforge: error: '--seed' must be in [0, 9223372036854775807], got {big}", argv
    assert list(tmp_path.iterdir()) == []
    code, _, err = run_cli(capsys, "train", "--config", CONFIG, "--set", "seed=1.0e+26", "--print-config")
    assert_one_line_error(code, err)
    assert err.strip() == ("phiforge: error: 'seed' must fit in 64 bits (-2**63 to 2**63 - 1), got "
                           "100000000000000004764729344")


@pytest.mark.parametrize("sets, message", [
    (["threads=1099511627776"], "'threads' must be at most 4096 (CPU threads per process), got 1099511627776"),
    (["model.n_layer=1099511627776"], "'model.n_layer' must be at most 4096 (phiforge's limit), got 1099511627776"),
    (["model.n_embd=1099511627776"], "'model.n_embd' must be at most 262144 (phiforge's limit), got 1099511627776"),
    (["model.moe={num_experts: 1099511627776, top_k: 1}"],
     "'model.moe.num_experts' must be at most 4096 (phiforge's limit), got 1099511627776"),
    (["data.seed=100000000000000000000"],
     "'data.seed' must fit in 64 bits (-2**63 to 2**63 - 1), got 100000000000000000000"),
])
def test_sizes_that_overflow_torch_are_one_line(sets, message, data, tmp_path, capsys):
    """Each of these reached torch unchecked: an integer overflow inside it, or a model built layer by layer on
    the meta device until the machine ran out of memory (n_layer)."""
    code, out, err = train(capsys, data, tmp_path / "run", *sets)
    assert_one_line_error(code, err)
    assert err.strip() == f"phiforge: error: {message}"
    assert not (tmp_path / "run").exists()


def test_cpu_out_of_memory_in_training_names_the_settings(data, tmp_path, capsys, monkeypatch):
    """The CPU allocator's own error (an allocation of 4 EiB fails at once) during a step: the advice the CUDA
    path gives, for a CPU."""
    monkeypatch.setenv("PHIFORGE_FAULT", "cpu_oom@2")
    code, out, err = train(capsys, data, tmp_path / "run")
    assert_one_line_error(code, err)
    assert err.strip() == (
        "phiforge: error: CPU out of memory at step 2 (micro_batch_size=4, data.seq_len=32, "
        "parallel.activation_checkpointing=none, parallel.strategy=none on 1 device(s), precision=fp32, "
        "loss_chunk_rows=0): lower micro_batch_size (raise "
        "grad_accum_steps to keep the global batch), set parallel.activation_checkpointing=full (or selective), "
        "lower the sequence length, set loss_chunk_rows (e.g. 4096), or train on a machine with more memory (or a "
        "GPU); `phiforge plan` predicts what fits")
    assert not (tmp_path / "run" / "errors" / "rank-0.txt").exists()


def _forward_out_of_memory(monkeypatch):
    from phiforge.model import Phi2

    def forward(self, *args, **kwargs):
        torch.empty(2**62, dtype=torch.uint8)  # 4 EiB: the CPU allocator refuses at once

    monkeypatch.setattr(Phi2, "forward", forward)
    monkeypatch.setattr(Phi2, "hidden_states", forward)  # what the evaluation calls


def test_cpu_out_of_memory_in_eval_and_generate(ckpt, tmp_path, capsys, monkeypatch):
    (tmp_path / "t.txt").write_text("A few words of text to score, enough for one window.\n")
    _forward_out_of_memory(monkeypatch)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--text", tmp_path / "t.txt", "--device", "cpu")
    err = err.split("\r")[-1]  # after the progress bar, which a terminal shows cleared (tqdm's leave=False)
    assert_one_line_error(code, err)
    assert err.strip() == ("phiforge: error: CPU out of memory (tried to allocate 4,294,967,296.0 GiB): lower "
                           "--batch-size (now 8) or --context, use --dtype bfloat16, or a device with more memory "
                           "(--device)")
    code, out, err = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "hi", "--device", "cpu",
                             "--max-new-tokens", "5")
    assert_one_line_error(code, err)
    assert err.strip() == ("phiforge: error: CPU out of memory (tried to allocate 4,294,967,296.0 GiB): lower "
                           "--max-new-tokens (now 5) or use a device with more memory (--device)")


def test_out_of_memory_anywhere_else_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    """Out of memory where no command gives advice of its own (here: loading the checkpoint)."""
    from phiforge import model_files as checkpoint

    def load(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(checkpoint, "load_checkpoint", load)
    code, out, err = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "hi")
    assert_one_line_error(code, err)
    assert err.strip() == ("phiforge: error: CPU out of memory (an allocation failed): the model or the batch does "
                           "not fit in this machine's memory; use smaller settings (`phiforge plan` predicts what "
                           "training needs) or a machine with more memory (--debug shows where it ran out)")


@pytest.mark.parametrize("flag", ["--temperature", "--top-p"])
def test_sampling_values_below_float32_resolution_still_sample(flag, ckpt, capsys):
    """1e-320 is a valid temperature / top-p; in float32 it is 0, which gave NaN probabilities (and a crash)."""
    code, out, err = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "hi", flag, "1e-320",
                             "--max-new-tokens", "4", "--seed", "1")
    assert code == 0, err
    greedy = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "hi", "--temperature", "0",
                     "--max-new-tokens", "4")[1]
    assert out == greedy  # both leave only the likeliest token


def test_upcycle_noise_must_be_a_number(ckpt, tmp_path, capsys):
    code, out, err = run_cli(capsys, "convert", "upcycle", ckpt, tmp_path / "u", "--moe", "num_experts=2,top_k=1",
                             "--noise", "nan")
    assert_one_line_error(code, err)
    assert err.strip() == "phiforge: error: '--noise' must be a finite number, got nan"
    assert not (tmp_path / "u").exists()


# ---------------------------------------------------------------------------------------------
# 15: smaller ones


def _copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_index_with_a_negative_vocabulary_is_refused(data, tmp_path, capsys):
    code, out, err = run_cli(capsys, "data", "inspect", data, "--sample-tokens", "-5")  # sliced from the end
    assert_one_line_error(code, err)
    assert err.strip() == "phiforge: error: '--sample-tokens' must be at least 0 (0 decodes none), got -5"
    d = _copy_dataset(data, tmp_path / "d")
    index = json.loads((d / "index.json").read_text())
    index["tokenizer"]["vocab_size"] = -5
    (d / "index.json").write_text(json.dumps(index))
    code, out, err = run_cli(capsys, "data", "inspect", d)
    assert_one_line_error(code, err)
    assert err.strip() == (f"phiforge: error: corrupt dataset index {d / 'index.json'}: 'tokenizer.vocab_size' must "
                           "be from 1 to 2**32 (what uint32 token ids hold), got -5")
    index["tokenizer"]["vocab_size"], index["tokenizer"]["eot_id"] = 512, 512
    (d / "index.json").write_text(json.dumps(index))
    code, out, err = run_cli(capsys, "data", "inspect", d)
    assert_one_line_error(code, err, "'tokenizer.eot_id' must be a token id below vocab_size 512, got 512")


def test_document_of_zero_bytes_is_refused_not_nan(ckpt, gutenberg_dir, tmp_path, capsys):
    d = _copy_dataset(gutenberg_dir, tmp_path / "d")
    docs = [json.loads(line) for line in (d / "documents.jsonl").read_text().splitlines()]
    victim = next(doc for doc in docs if doc["split"] == "val")
    victim["bytes"] = 0
    (d / "documents.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", d, "--device", "cpu")
    assert_one_line_error(code, err)
    assert err.strip() == (f"phiforge: error: document {victim['id']!r} in {d / 'documents.jsonl'} has 'bytes': 0, "
                           "but a document holds at least one byte; the record is corrupt (prepare the dataset again)")


def test_duplicate_yaml_key_is_an_error_in_every_reader(tmp_path, capsys):
    from phiforge.config import load_yaml
    from phiforge.data.corpora import load_prepare_config

    (tmp_path / "c.yaml").write_text("model:\n  preset: small\noptim:\n  lr: 1.0e-3\n  warmup_steps: 5\n"
                                     "  lr: 2.0e-3\n")
    code, out, err = run_cli(capsys, "train", "--config", tmp_path / "c.yaml", "--print-config")
    assert_one_line_error(code, err)
    assert err.strip() == (f"phiforge: error: config file {tmp_path / 'c.yaml'} is not valid YAML: duplicate key "
                           "'lr' (lines 4 and 6)")
    code, out, err = run_cli(capsys, "tokenizer", "train", "--config", tmp_path / "c.yaml", "--print-config")
    assert_one_line_error(code, err, "duplicate key 'lr' (lines 4 and 6)")
    with pytest.raises(ConfigError, match=r"is not valid YAML: duplicate key 'val_books' \(lines 1 and 2\)$"):
        load_prepare_config("gutenberg", path=_yaml(tmp_path, "val_books: 1\nval_books: 2\n"))
    code, out, err = run_cli(capsys, "train", "--config", CONFIG, "--set", "optim={lr: 1.0e-3, lr: 2.0e-3}")
    assert_one_line_error(code, err)
    assert err.strip() == "phiforge: error: --set optim={lr: 1.0e-3, lr: 2.0e-3}: duplicate key 'lr'"
    # a merge key overrides what it merges: YAML's rule, not a duplicate
    assert load_yaml("base: &b {lr: 1}\noptim:\n  <<: *b\n  lr: 2\n") == {"base": {"lr": 1}, "optim": {"lr": 2}}


def _yaml(tmp_path: Path, text: str) -> Path:
    (tmp_path / "p.yaml").write_text(text)
    return tmp_path / "p.yaml"


def test_eval_tasks_mapping_form_works_as_documented(tmp_path, capsys):
    """docs/evaluation.md: `{name, path, format, limit, num_fewshot}` entries next to NAME[:FORMAT]=PATH."""
    import yaml

    tasks = "[cloze=a.jsonl, {name: hellaswag, path: h.jsonl, limit: 100}, {name: book, path: b.txt, format: text}]"
    code, out, err = run_cli(capsys, "train", "--config", CONFIG, "--set", f"eval_tasks={tasks}", "--print-config")
    assert code == 0, err
    assert yaml.safe_load(out)["eval_tasks"] == [
        {"name": "cloze", "path": "a.jsonl", "format": None, "limit": 200, "num_fewshot": 0},
        {"name": "hellaswag", "path": "h.jsonl", "format": None, "limit": 100, "num_fewshot": 0},
        {"name": "book", "path": "b.txt", "format": "text", "limit": 200, "num_fewshot": 0}]


def test_eval_threads_flag(ckpt, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("A few words of text to score, enough for one window.\n")
    before = torch.get_num_threads()
    try:
        code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--text", tmp_path / "t.txt", "--threads", "1",
                                 "--device", "cpu")
        assert code == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "--threads 1" in (ROOT / "docs" / "evaluation.md").read_text()
