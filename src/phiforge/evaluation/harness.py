"""The bridge to lm-evaluation-harness (`phiforge eval --harness lm-eval`; needs the `eval` extra).

The checkpoint is exported to Hugging Face format (phiforge.hf.convert_to_hf) in a temporary directory, and
lm_eval.simple_evaluate runs its `hf` model on it, fully offline: HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and
TRANSFORMERS_OFFLINE are set before lm_eval is imported, so tasks must read local files (a YAML task with
`dataset_path: json` and local `data_files`, found through `include_path`; docs/evaluation.md).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from phiforge.errors import ConfigError, PhiforgeError

OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


MC_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def mc_task_yaml(task: str, path: str | Path) -> str:
    """An lm-eval task YAML for a generic multiple-choice file (the `mc` format: context, choices, label) that
    scores it as `phiforge eval --tasks mc=PATH` does, k-shot included (demonstrations from the same file)."""
    return MC_TASK_YAML.format(task=task, path=Path(path).resolve())


def import_lm_eval():
    """lm_eval, imported offline; PhiforgeError naming the extra when it is not installed."""
    for var in OFFLINE:
        os.environ[var] = "1"
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise PhiforgeError(f"--harness lm-eval needs lm-evaluation-harness: pip install 'phiforge[eval]' ({e})") \
            from None
    return lm_eval, TaskManager


def task_manager(tasks: list[str], include_path: str | Path | None = None):
    """lm-eval's TaskManager with `include_path`; ConfigError naming the tasks it does not know."""
    _, TaskManager = import_lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path} is not a directory")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (none in {include_path} or lm-eval's own)" if include_path else " (give --include-path DIR)"
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)}{where}")
    return manager


def run_lm_eval(checkpoint: str | Path, tasks: list[str], *, include_path: str | Path | None = None,
                num_fewshot: int | None = None, limit: int | None = None, batch_size: int | str = 1,
                device: str = "cpu", seed: int = 1234, dtype: str = "float32", log_samples: bool = False) -> dict:
    """lm_eval.simple_evaluate's result (JSON-safe: results, configs, n-shot, samples with log_samples) for the
    checkpoint's HF export (weights in `dtype`) on `tasks`, run on `device` (a torch device's name: `phiforge eval
    --device auto` resolves auto with train.distributed.resolve_device; evaluation imports nothing of training)."""
    from phiforge.hf import convert_to_hf
    from phiforge.model_files import resolve_checkpoint

    lm_eval, _ = import_lm_eval()
    manager = task_manager(tasks, include_path)
    kwargs = dict(tasks=tasks, task_manager=manager, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                  device=device, log_samples=log_samples, bootstrap_iters=0, fewshot_random_seed=seed)
    with tempfile.TemporaryDirectory(prefix="phiforge-lm-eval-") as tmp:
        export = Path(tmp) / "hf"
        convert_to_hf(resolve_checkpoint(Path(checkpoint)), export, dtype=dtype)
        result = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(export), "dtype": dtype}, **kwargs)
    keep = {k: result[k] for k in ("results", "configs", "n-shot", "samples") if k in result}
    return json.loads(json.dumps(keep, default=str))
