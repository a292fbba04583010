import json
import math

import pytest
import yaml

from phiforge.config import load_config
from phiforge.errors import ConfigError
from phiforge.model_files import load_checkpoint
from phiforge.train.config import OptimConfig, TrainConfig
from phiforge.train.optim import lr_at

from conftest import assert_one_line_error, run_cli

SMALL = ["--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_head=4",
         "--set", "model.intermediate_size=256", "--set", "data.seq_len=64", "--set", "micro_batch_size=4",
         "--set", "optim.lr=3e-3", "--set", "optim.warmup_steps=5", "--set", "eval_batches=4"]


def read_metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_learns_saves_and_generates(capsys, gutenberg_dir, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--config", "configs/demo-cpu-gpt2.yaml", *SMALL,
                             "--set", f"data.dir={gutenberg_dir}", "--set", f"out_dir={run}",
                             "--set", "max_steps=40", "--set", "eval_interval=20", "--set", "save_interval=20",
                             "--set", "log_interval=5")
    assert code == 0, err
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["max_steps"] == 40 and resolved["model"]["n_embd"] == 64
    m = read_metrics(run)
    evals = [r for r in m if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[0]["val_loss"] - evals[-1]["val_loss"] > 1.5  # it learns something real
    trains = [r for r in m if r["event"] == "train"]
    assert [r["step"] for r in trains] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in trains)
    for prev, r in zip(trains, trains[1:]):  # the rate over each log window: its tokens over its seconds
        rate = (r["tokens"] - prev["tokens"]) / (r["elapsed_s"] - prev["elapsed_s"])
        assert r["tokens_per_s"] == pytest.approx(rate, rel=1e-6)
    assert m[-1]["event"] == "end" and m[-1]["tokens"] == 40 * 4 * 64
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000020", "step-00000040"]
    assert (run / "latest").read_text().strip() == "step-00000040"
    model = load_checkpoint(run / "checkpoints" / "step-00000040")
    assert model.cfg.n_embd == 64
    code, out, err = run_cli(capsys, "generate", "--checkpoint", run, "--prompt", "Emma was",
                             "--max-new-tokens", "12", "--temperature", "0")
    assert code == 0, err
    assert out.startswith("Emma was") and len(out) > len("Emma was") + 5
    code, out2, _ = run_cli(capsys, "generate", "--checkpoint", run, "--prompt", "Emma was",
                            "--max-new-tokens", "12", "--temperature", "0")
    assert out2 == out  # greedy is deterministic


def test_lr_schedules():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)
    assert lr_at(55, 100, cfg) == pytest.approx(0.55)  # cosine midpoint
    lin = OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert lr_at(50, 100, lin) == pytest.approx(0.5)
    wsd = OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(79, 100, wsd) == 1.0 and lr_at(90, 100, wsd) == pytest.approx(0.5)


def test_no_weight_decay_on_biases_norms_embeddings():
    from phiforge.model import Phi2, Phi2Config
    from phiforge.train.optim import build_optimizer

    model = Phi2(Phi2Config.from_preset("tiny"))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim == 2 and "embed" not in name), name


def test_config_yaml_cli_python_are_one_object(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1e-3\nmax_steps: 7\n")
    cfg = load_config(TrainConfig, f, ["optim.schedule=wsd", "data.seq_len=32"])
    assert cfg == TrainConfig(max_steps=7, optim=OptimConfig(lr=1e-3, schedule="wsd"),
                              data=cfg.data.__class__(seq_len=32))
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_config(TrainConfig, f, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="'max_steps' must be an integer"):
        load_config(TrainConfig, f, ["max_steps=lots"])
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(TrainConfig, f)


@pytest.mark.parametrize("sets,needle", [
    (["model.preset=gigantic"], "unknown preset 'gigantic'"),
    (["model.n_layerz=3"], "n_layerz"),
    (["bogus=1"], "unknown config key 'bogus'"),
])
def test_train_bad_config_is_one_line(capsys, tmp_path, sets, needle):
    args = ["train", "--config", "configs/demo-cpu.yaml", "--set", f"out_dir={tmp_path / 'r'}"]
    for s in sets:
        args += ["--set", s]
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, needle)


def test_train_data_dir_without_index(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--config", "configs/demo-cpu.yaml", "--set", f"data.dir={tmp_path}",
                           "--set", f"out_dir={tmp_path / 'r'}")
    assert_one_line_error(code, err, "no index.json")


def test_train_tiny_vocab_mismatch_is_explained(capsys, gutenberg_dir, tmp_path):
    code, _, err = run_cli(capsys, "train", "--set", "model.preset=tiny", "--set", f"data.dir={gutenberg_dir}",
                           "--set", f"out_dir={tmp_path / 'r'}")
    assert_one_line_error(code, err, "50257")


def test_generate_bad_inputs(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--checkpoint", tmp_path / "missing", "--prompt", "hi")
    assert_one_line_error(code, err, "not found", "missing")
    code, _, err = run_cli(capsys, "generate", "--checkpoint", tmp_path, "--prompt", "")
    assert_one_line_error(code, err, "empty prompt")
    (tmp_path / "config.json").write_text("{broken")
    code, _, err = run_cli(capsys, "generate", "--checkpoint", tmp_path, "--prompt", "hi")
    assert_one_line_error(code, err, "config.json")


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "nope.yaml")
    assert_one_line_error(code, err, "config file not found", "nope.yaml")


def test_print_config_is_a_config_file_that_reproduces_the_run(capsys, tmp_path):
    """--print-config shows defaults + file + --set, trains nothing, and its output loads back to the same config."""
    sets = ["--set", "optim.lr=1e-3", "--set", "data.mixture=index", "--set", f"out_dir={tmp_path / 'run'}"]
    code, out, err = run_cli(capsys, "train", "--config", "configs/demo-cpu.yaml", *sets, "--resume", "auto",
                             "--print-config")
    assert code == 0, err
    (tmp_path / "printed.yaml").write_text(out)
    printed = load_config(TrainConfig, tmp_path / "printed.yaml")
    expected = load_config(TrainConfig, "configs/demo-cpu.yaml",
                           ["optim.lr=1e-3", "data.mixture=index", f"out_dir={tmp_path / 'run'}", "resume=auto"])
    assert printed == expected and printed.optim.lr == 1e-3 and printed.resume == "auto"
    assert "parallel:" in out and not (tmp_path / "run").exists()
    code, out, err = run_cli(capsys, "vision", "finetune", "--set", "stage1.steps=7", "--print-config")
    assert code == 0 and yaml.safe_load(out)["stage1"]["steps"] == 7, err
