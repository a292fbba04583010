"""Model directories: phiforge's single-directory checkpoint format (what training leaves as a run's final model,
what `generate`, `eval` and `convert` read), its safetensors weights, and the one writer of exported model
directories (`convert to-hf`, `convert to-litgpt`). A run's resumable training state (DCP shards, optimizer) is
phiforge.train.checkpointing.

    DIR/config.json                      {"format": "phiforge", "format_version": 1, "model": {...Phi2Config...}}
    DIR/model.safetensors                weights (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
    DIR/tokenizer.json (+ any other tokenizer files carried over from a source checkpoint)

Loading only reads JSON and safetensors, so it never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from phiforge.errors import CheckpointError, ConfigError
from phiforge.fileio import claim_output_dir, output_dir, plain_name, write_json_atomic
from phiforge.model import Phi2, Phi2Config
from phiforge.model.init import on_meta

FORMAT = "phiforge"
FORMAT_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 4 * 2**30
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # convert --dtype

_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
               type(None): "null"}


def read_json(path: Path, what: str) -> dict:
    """The JSON object in `path`; anything else (missing, unreadable, not JSON, not an object) a CheckpointError."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} is not valid JSON: {path} ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object ({{...}}), not {_JSON_TYPES[type(data)]}")
    return data


def load_torch_file(source, what: str, **kwargs):
    """torch.load(source, weights_only=True) on the CPU: tensors and plain containers only, never code. A file that
    holds anything else, or is not a torch file, is a CheckpointError naming `what` and why, without torch's advice
    to load it with weights_only=False (which would run whatever code it carries)."""
    import pickle

    name = f"{what} {source}" if isinstance(source, (str, Path)) else what
    try:
        return torch.load(source, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        why = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line.split(":")[0]]
        raise CheckpointError(f"refusing {name}: it holds more than tensors and plain containers"
                              f"{': ' + why[0][:200] if why else ''} (phiforge never runs code a file carries)") \
            from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {name}: {first}") from None


# ---------------------------------------------------------------------------------------------
# Safetensors state dicts (also used by the HF converter)


def save_state_dict(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    metadata: dict | None = None) -> None:
    """Write model.safetensors, or HF-style shards plus an index when larger than max_shard_bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    total = sum(v.numel() * v.element_size() for v in state.values())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE_NAME), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = shard_name(i, len(shards))
        save_file(shard, str(out_dir / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    write_index(out_dir, weight_map, total)


def shard_name(i: int, n: int) -> str:
    """The HF-style name of weight file i (1-based) of n."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def write_index(out_dir: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """model.safetensors.index.json: which shard holds each tensor."""
    write_json_atomic(Path(out_dir) / INDEX_NAME, {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})


def weight_files(src_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: model.safetensors, or the shards its index lists."""
    src_dir = Path(src_dir)
    index = src_dir / INDEX_NAME
    if index.exists():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"safetensors index has no weight_map: {index}")
        outside = [n for n in weight_map.values() if not plain_name(n)]
        if outside:
            raise CheckpointError(f"safetensors index {index} names a weight file outside its folder: "
                                  f"{outside[0]!r:.100} (entries must be plain file names)")
        names = sorted(set(weight_map.values()))
    elif (src_dir / SINGLE_NAME).exists():
        names = [SINGLE_NAME]
    else:
        raise CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} in {src_dir}")
    files = [src_dir / name for name in names]
    for path in files:
        if not path.exists():
            raise CheckpointError(f"weight file listed in the index is missing: {path}")
    return files


@contextmanager
def open_weights(src_dir: Path):
    """{tensor name: an open safetensors file holding it}, for reading whole tensors or slices lazily."""
    with ExitStack() as stack:
        by_name = {}
        for path in weight_files(src_dir):
            try:
                f = stack.enter_context(safe_open(str(path), framework="pt"))
                by_name.update({k: (f, path) for k in f.keys()})
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"corrupt safetensors file {path}: {e}") from None
        yield by_name


def load_state_dict(src_dir: Path) -> dict[str, torch.Tensor]:
    """Read model.safetensors or an indexed set of shards from src_dir."""
    state = {}
    with open_weights(src_dir) as tensors:
        for k, (f, path) in tensors.items():
            try:
                state[k] = f.get_tensor(k)
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"corrupt safetensors file {path}: {e}") from None
    return state


@torch.no_grad()
def load_weights_(model: torch.nn.Module, src_dir: Path) -> None:
    """Fill `model`'s weights (plain tensors, or this rank's FSDP shards) from the checkpoint in src_dir,
    reading only the rows this rank holds. Checks every name and shape first."""
    from phiforge.model.init import canonical_name, local_rows

    keys = {canonical_name(k) for k in model.state_dict()}
    targets = {canonical_name(n): t for n, t in [*model.named_parameters(), *model.named_buffers()]
               if canonical_name(n) in keys}
    with open_weights(src_dir) as tensors:
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k, (f, _) in tensors.items()}
        check_state_dict({k: torch.empty(t.shape, device="meta") for k, t in targets.items()}, shapes, str(src_dir))
        for name, t in targets.items():
            f, path = tensors[name]
            local, start = local_rows(t)
            try:
                src = f.get_slice(name)[start : start + local.size(0)] if t.dim() else f.get_tensor(name)
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"corrupt safetensors file {path}: {e}") from None
            local.copy_(src)


def check_state_dict(model: torch.nn.Module | dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                     source: str) -> None:
    """Raise CheckpointError naming missing, unexpected and wrong-shaped tensors.

    `model` may also be the expected state dict itself (e.g. HF-named keys, checked before conversion)."""
    expected = model if isinstance(model, dict) else model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))

    def few(keys):
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    problems = []
    if missing:
        problems.append(f"missing {few(missing)}")
    if extra:
        problems.append(f"unexpected {few(extra)}")
    if wrong:
        k = wrong[0]
        problems.append(f"wrong shape for {k}: {tuple(state[k].shape)} in file, "
                        f"{tuple(expected[k].shape)} in model" + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    if problems:
        raise CheckpointError(f"weights in {source} do not fit the model: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# phiforge checkpoints


def read_config(ckpt_dir: Path) -> Phi2Config:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
    meta = read_json(ckpt_dir / "config.json", "checkpoint config")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt_dir / 'config.json'} is not a phiforge checkpoint config "
                              "(for a Hugging Face checkpoint run `phiforge convert from-hf` first)")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{ckpt_dir / 'config.json'}: 'format_version' must be an integer, got {version!r:.40}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {version} is newer than this phiforge supports "
                              f"({FORMAT_VERSION}); upgrade phiforge")
    try:
        return Phi2Config.from_dict(meta.get("model", {}))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"bad model config in {ckpt_dir / 'config.json'}: {e}") from None


def save_checkpoint(model: Phi2, out_dir: Path, tokenizer_dir: Path | None = None, extra: dict | None = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
                    inputs=(), overwrite: bool = False, kind: str = "model") -> Path:
    """Write a complete checkpoint directory through fileio.output_dir: OUT must be new, empty or an earlier
    checkpoint (else `overwrite`), never one of `inputs`; a crash leaves no half checkpoint.

    `extra_weights` maps file names to state dicts saved beside the model's (e.g. vision.safetensors)."""
    with output_dir(out_dir, kind, inputs=[*inputs, tokenizer_dir], overwrite=overwrite) as tmp:
        write_model_files(tmp, model.state_dict(), model.cfg, tokenizer_dir=tokenizer_dir, extra=extra,
                          max_shard_bytes=max_shard_bytes, extra_weights=extra_weights)
    return Path(out_dir)


def write_model_files(out_dir: Path, state: dict[str, torch.Tensor], cfg: Phi2Config,
                      tokenizer_dir: Path | None = None, extra: dict | None = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      extra_weights: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Write weights (and any extra weight files), tokenizer and config.json (last) into an existing directory;
    not atomic by itself (save_checkpoint wraps it in fileio.output_dir; the training engine writes into its own
    step-N.tmp)."""
    from phiforge.tokenizer import save_tokenizer_files

    out_dir = Path(out_dir)
    save_state_dict(dict(state), out_dir, max_shard_bytes=max_shard_bytes)
    for name, extra_state in (extra_weights or {}).items():
        save_file({k: v.detach().contiguous().cpu() for k, v in extra_state.items()}, str(out_dir / name))
    save_tokenizer_files(out_dir, source_dir=tokenizer_dir)
    write_model_config(out_dir, cfg, extra)


def write_model_config(out_dir: Path, cfg: Phi2Config, extra: dict | None = None) -> None:
    """config.json, written last: a directory with it holds a whole model."""
    write_json_atomic(Path(out_dir) / "config.json", {"format": FORMAT, "format_version": FORMAT_VERSION,
                                                      "model": cfg.to_dict(), **(extra or {})})


def load_checkpoint(ckpt_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    eval_context: int | None = None) -> Phi2:
    """Build the model from config.json and load its weights, checking every key and shape. eval_context: the
    model's context in evaluations (Phi2's run option; None: max_seq_len)."""
    cfg = read_config(ckpt_dir)
    with on_meta():
        model = Phi2(cfg, eval_context=eval_context)
    state = load_state_dict(ckpt_dir)
    check_state_dict(model, state, str(ckpt_dir))
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rope()
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint directory or a training run directory (whose `latest` file names its newest checkpoint)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if (path / "train_state.json").exists():
        raise CheckpointError(f"{path} is a sharded training checkpoint; run `phiforge checkpoint consolidate "
                              f"{path} OUT` and use OUT")
    ckpt = read_latest(path)
    if ckpt is not None:
        if not (ckpt / "config.json").exists() and (ckpt / "train_state.json").exists():
            raise CheckpointError(f"{ckpt} is a sharded training checkpoint (the run stopped before its final save); "
                                  f"run `phiforge checkpoint consolidate {ckpt} OUT` and use OUT")
        return ckpt
    if not path.exists():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    raise CheckpointError(f"{path} holds no config.json: not a phiforge checkpoint or run directory")


def read_latest(run_dir: Path) -> Path | None:
    """RUN/checkpoints/NAME for the NAME a run's `latest` file holds; None when RUN has no `latest`. A `latest`
    that is not a UTF-8 file holding one plain name (so never a path out of RUN/checkpoints) is a CheckpointError."""
    pointer = Path(run_dir) / "latest"
    if not pointer.exists() and not pointer.is_symlink():
        return None
    if pointer.is_symlink() or not pointer.is_file():
        raise CheckpointError(f"{pointer} is {'a link' if pointer.is_symlink() else 'not a file'}: it must be the "
                              "file phiforge writes, naming the run's newest checkpoint (such as step-00000100)")
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer} is not UTF-8 text: it must name the run's newest checkpoint (such as "
                              "step-00000100)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {pointer}: {e.strerror}") from None
    if not plain_name(name):
        raise CheckpointError(f"{pointer} holds {name!r:.80}, not the name of a checkpoint in "
                              f"{Path(run_dir) / 'checkpoints'} (such as step-00000100)")
    return Path(run_dir) / "checkpoints" / name


# ---------------------------------------------------------------------------------------------
# Conversions: the one writer of exported model directories, and the summary every converter returns


def conversion_summary(state: dict[str, torch.Tensor], out: Path, warnings: list[str] | None = None) -> dict:
    """What `phiforge convert` prints for every converter: parameters, dtypes, the files of OUT, warnings."""
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    return {"params": sum(v.numel() for v in state.values()), "dtype": ", ".join(dtypes), "out": str(out),
            "files": sorted(p.name for p in Path(out).iterdir() if p.is_file() and not p.name.startswith(".")),
            "warnings": warnings or []}


@dataclass
class ExportSource:
    """A phiforge checkpoint read for an export: its directory, config.json, model config and checked weights
    (already in the export's dtype)."""

    dir: Path
    meta: dict
    cfg: Phi2Config
    state: dict[str, torch.Tensor]


def export_model(src_dir: Path, out_dir: Path, kind: str, target: str,
                 unrepresentable: Callable[[dict], list[str]], write: Callable[[Path, ExportSource], list[str]],
                 dtype: str | None = None, overwrite: bool = False) -> dict:
    """`phiforge convert to-KIND SRC OUT` for a checkpoint or run directory SRC: OUT is claimed before anything is
    read (fileio's rule, output kind `kind`), then the model config fields that `target` cannot express
    (`unrepresentable(config.json's model dict)`) are refused, the weights are checked against the model and
    cast to `dtype`, and `write(new directory, source)` fills the directory that replaces OUT (fileio.output_dir),
    returning the warnings for the summary."""
    given = Path(src_dir)
    src_dir, out_dir = resolve_checkpoint(given), Path(out_dir)
    claim_output_dir(out_dir, kind, [given, src_dir], overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}' (choose from: {', '.join(DTYPES)})")
    # the raw dict before read_config, which would reject keys it does not know with a less useful message
    meta = read_json(src_dir / "config.json", "checkpoint config")
    bad = unrepresentable(meta["model"]) if isinstance(meta.get("model"), dict) else []
    if bad:
        raise CheckpointError(f"model config field(s) {', '.join(bad)} in {src_dir} cannot be represented in a "
                              f"{target}; this model cannot be exported with `convert to-{kind}`")
    cfg = read_config(src_dir)
    state = load_state_dict(src_dir)
    with on_meta():
        check_state_dict(Phi2(cfg), state, str(src_dir))
    if dtype is not None:
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    with output_dir(out_dir, kind, [given, src_dir], overwrite) as tmp:
        warnings = write(Path(tmp), ExportSource(src_dir, meta, cfg, state))
    return conversion_summary(state, out_dir, warnings)
