"""Every row of the table in docs/errors.md that this file knows how to set up runs through the CLI in-process and
must give exactly the documented line: `phiforge: error: ...` (one line, non-zero exit, no traceback) or
`phiforge: note: ...` (a clamp: exit 0, the note on stderr before any output).

A row's first cell is `phiforge ARGS` in backticks, optionally followed by a second code span `PATH: TEXT`: TEXT
(YAML or JSON) is merged into PATH before the command runs. Placeholders: CKPT (a text checkpoint with a 32-token
context), VCKPT (the same as a vision checkpoint), IMG (an image), HF (a Hugging Face Phi directory), OUT (a new
directory), FILE (a copy of configs/demo-cpu.yaml), LONG (a 40-token prompt). The example configs named in a row
are run from copies whose out_dir and data paths point into a temporary directory, so nothing is trained.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
PLACEHOLDERS = ("VCKPT", "CKPT", "IMG", "HF", "OUT", "FILE", "LONG")
CONFIGS = {"configs/demo-cpu.yaml": {"out_dir": "run", "data": {"dir": "no-data"}},
           "configs/vision-synth-cpu.yaml": {"out_dir": "run", "data": {"train": "no-data/train.json", "val": None}}}
# the bad inputs of issue 17, items 6-8: each must have a row
REQUIRED = ["model.n_layer=abc", "model.n_embd=128.5", "model.n_layer=-2", "model.n_head=0", '"n_layer": "four"',
            '"num_hidden_layers": "four"', "--print-config", "optim.lr=0 ", "optim.warmup_steps=-10",
            "optim.grad_clip=-1", "optim.lr=-0.01", "optim.beta1=1.5", "threads=-4", "--temperature -1",
            "--temperature nan", "--temperature inf", "--top-k -3", "--top-k 1000000", "--top-p 1.5", "--top-p -0.5",
            "--max-new-tokens 100", "LONG", "vision generate"]


def table_rows() -> list[tuple[str, str]]:
    """(input cell, message) for each row of the doc's tables whose input is a command and that this test checks:
    every two-cell row, and the three-cell rows whose third cell (the tests that check the row) names
    test_documented_message; the other three-cell rows are checked by the tests they name."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        ours = len(cells) == 2 or (len(cells) == 3 and "test_documented_message" in cells[2])
        if ours and cells[0].startswith("`phiforge "):
            rows.append((cells[0], cells[1].strip("`").replace("\\|", "|")))
    return rows


def placeholders(cell: str) -> set[str]:
    return set(re.findall(r"\b[A-Z]{2,}\b", " ".join(re.findall(r"`([^`]+)`", cell))))


def runnable(cell: str) -> bool:
    return placeholders(cell) <= set(PLACEHOLDERS)


ROWS = [r for r in table_rows() if runnable(r[0])]


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(base.get(k) or {}, v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """CKPT, VCKPT, IMG and HF, built once; each row works on copies."""
    from PIL import Image

    from phiforge.hf import config_to_hf, state_dict_to_hf
    from phiforge.model import Phi2, Phi2Config
    from phiforge.model_files import save_checkpoint, save_state_dict
    from phiforge.vision.config import VisionConfig
    from phiforge.vision.model import VisionLM, save_vision_checkpoint

    d = tmp_path_factory.mktemp("sources")
    lm = dict(n_layer=1, n_embd=16, n_head=2, intermediate_size=32, max_seq_len=32, rotary_pct=0.5)
    torch.manual_seed(0)
    save_checkpoint(Phi2(Phi2Config(**lm)), d / "CKPT")
    save_vision_checkpoint(VisionLM(Phi2(Phi2Config(**lm, xattn={})), VisionConfig()), d / "VCKPT")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(d / "IMG.png")
    hf_cfg = Phi2Config(vocab_size=256, n_layer=1, n_embd=16, n_head=2, intermediate_size=32, max_seq_len=32,
                        rotary_pct=0.5)
    save_state_dict(state_dict_to_hf(Phi2(hf_cfg).state_dict(), hf_cfg), d / "HF")
    (d / "HF" / "config.json").write_text(json.dumps(config_to_hf(hf_cfg)))
    return {"CKPT": d / "CKPT", "VCKPT": d / "VCKPT", "IMG": d / "IMG.png", "HF": d / "HF"}


def prepare(cell: str, sources: dict[str, Path], tmp: Path) -> tuple[list[str], dict[str, str]]:
    """argv for a row's command, and placeholder -> path as it appears in messages."""
    command, *edits = re.findall(r"`([^`]+)`", cell)
    paths = {}
    for name, src in sources.items():
        dst = tmp / src.name
        if name in placeholders(cell):  # copy only what the row uses
            shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
        paths[name] = str(dst)
    paths["OUT"] = str(tmp / "OUT")
    paths["LONG"] = "word " * 40
    for config, redirect in CONFIGS.items():
        data = _merge(yaml.safe_load((ROOT / config).read_text()), {
            k: str(tmp / v) if isinstance(v, str) else {kk: vv and str(tmp / vv) for kk, vv in v.items()}
            for k, v in redirect.items()})
        (tmp / Path(config).name).write_text(yaml.safe_dump(data))
        paths[config] = str(tmp / Path(config).name)
    paths["FILE"] = paths["configs/demo-cpu.yaml"]
    for edit in edits:
        target, text = edit.split(": ", 1)
        name, _, rel = target.partition("/")
        path = Path(paths[name]) / rel if rel else Path(paths[name])
        extra = yaml.safe_load("{" + text + "}")  # YAML flow mapping, so JSON too
        if path.suffix == ".json":
            path.write_text(json.dumps(_merge(json.loads(path.read_text()), extra)))
        else:
            path.write_text(yaml.safe_dump(_merge(yaml.safe_load(path.read_text()), extra)))
    argv = shlex.split(command)[1:]
    argv = [paths.get(a, a) for a in argv]
    shown = {name: paths[name] for name in ("VCKPT", "CKPT", "HF", "OUT")}
    return argv, shown


@pytest.mark.parametrize("cell, message", ROWS, ids=[re.sub(r"\s+", " ", c.strip("`"))[:80] for c, _ in ROWS])
def test_documented_message(cell, message, sources, tmp_path, capsys):
    argv, shown = prepare(cell, sources, tmp_path)
    message = re.sub(r"\b(VCKPT|CKPT|HF|OUT)\b", lambda m: shown[m[1]], message)
    code, out, err = run_cli(capsys, *argv)
    if message.startswith("phiforge: note:"):
        assert code == 0, err
        assert message in err.splitlines(), (message, err)
    else:
        assert_one_line_error(code, err)
        assert err.strip() == message
        assert out == ""  # nothing printed before the error (generate used to print the prompt first)


def test_table_covers_items_6_to_8():
    cells = " ".join(c for c, _ in ROWS)
    missing = [r for r in REQUIRED if r not in cells]
    assert not missing, f"docs/errors.md has no row for {missing}"
    assert len(ROWS) >= 50


def test_model_section_is_printed_in_its_own_shape(capsys):
    """--print-config keeps `model:` as preset + overrides, with the overrides' values of the right type."""
    code, out, err = run_cli(capsys, "train", "--config", ROOT / "configs/demo-cpu-gpt2.yaml", "--set", "model.n_layer=6.0",
                             "--set", "model.moe={num_experts: 4, top_k: 2.0}", "--print-config")
    assert code == 0, err
    assert yaml.safe_load(out)["model"] == {"preset": "small", "n_layer": 6, "moe": {"num_experts": 4, "top_k": 2}}
    assert "n_layer: 6\n" in out
    code, out, err = run_cli(capsys, "vision", "finetune", "--config", ROOT / "configs/vision-synth-cpu.yaml",
                             "--set", "model.xattn.heads=2.0", "--print-config")
    assert code == 0, err
    assert yaml.safe_load(out)["model"] == {"preset": "small", "xattn": {"every": 1, "context_dim": 128, "heads": 2,
                                                                         "ff": 2.0, "gate_init": 0.5}}


def test_python_configs_are_checked_too():
    """The checks live in the dataclasses, so configs built in Python get them (and their types coerced)."""
    from phiforge.errors import ConfigError
    from phiforge.generate import generate
    from phiforge.model import Phi2, Phi2Config
    from phiforge.train.config import OptimConfig

    with pytest.raises(ConfigError, match=r"'n_layer' must be an integer, got 'four'"):
        Phi2Config(n_layer="four")
    with pytest.raises(ConfigError, match=r"'beta2' must be in \[0, 1\), got 1.0"):
        OptimConfig(beta2=1.0)
    assert Phi2Config(n_layer=2.0, n_embd=32, n_head=2).n_layer == 2
    model = Phi2(Phi2Config(vocab_size=64, n_layer=1, n_embd=16, n_head=2, intermediate_size=32, max_seq_len=16,
                            rotary_pct=0.5))
    with pytest.raises(ConfigError, match="temperature"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 4, temperature=float("nan"))
