"""Reading DCP checkpoints without running code a crafted checkpoint carries.

DCP's `.metadata` is a pickle, and DCP unpickles it with `pickle.load`; a crafted one runs code on load. Its
non-tensor items (the optimizer's hyperparameters) are `torch.save` bytes that DCP's default planner reads with
`torch.load(weights_only=False)`. Here:

- `.metadata` is unpickled by an unpickler that builds only what DCP writes there (the dataclasses of
  torch.distributed.checkpoint.metadata, DCP's storage records, torch.Size, dtypes and layouts, paths) and
  refuses any other global, naming it; the result is then checked field by field, and every data file it
  names must be a plain name inside the checkpoint;
- non-tensor items are read with `torch.load(weights_only=True)` (tensors and plain containers only);
- per-rank metadata files (`__N.metadata`, which phiforge never writes) are refused.

`load_dcp(state_dict, ckpt)` is the one way phiforge loads a DCP checkpoint (resume, consolidate, export).
"""

from __future__ import annotations

import importlib
import io
import pickle
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)

from phiforge.errors import CheckpointError, PhiforgeError
from phiforge.fileio import plain_name

METADATA = ".metadata"
_DCP = "torch.distributed.checkpoint"
# (module, name) of every global DCP's FileSystemWriter pickles into .metadata (read from torch 2.14's
# metadata.py and filesystem.py, and from checkpoints it wrote: one process, and FSDP2 on 2 ranks)
ALLOWED_GLOBALS = {
    *((f"{_DCP}.metadata", n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                         "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta",
                                         "_MEM_FORMAT_ENCODING")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    *(("pathlib", n) for n in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
    ("collections", "OrderedDict"),
}


@lru_cache(maxsize=1)
def _allowed_classes() -> frozenset:
    found = (getattr(importlib.import_module(m), n) for m, n in ALLOWED_GLOBALS)
    return frozenset(c for c in found if isinstance(c, type))


class _MetadataUnpickler(pickle._Unpickler):
    """Builds only ALLOWED_GLOBALS and torch dtypes; BUILD (setting an object's state) only on instances of the
    classes among them, never on a class itself. The pure-Python unpickler, so that BUILD can be checked."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which DCP never writes there")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent reference, which DCP never writes there")

    def load_build(self):
        target = self.stack[-2] if len(self.stack) > 1 else None
        if type(target) not in _allowed_classes():
            what = f"type {target.__name__}" if isinstance(target, type) else f"a {type(target).__name__}"
            raise pickle.UnpicklingError(f"it sets the state of {what}, which DCP never does")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _check_structure(meta, path: Path) -> None:
    """What DCP's reader relies on: the types of every record, and data files that stay in the checkpoint."""
    def bad(why: str):
        raise CheckpointError(f"DCP metadata {path} is not one DCP wrote: {why}")

    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict) \
            or not isinstance(meta.storage_data, dict):
        bad("no state_dict_metadata and storage_data")
    for key, md in meta.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            ok = isinstance(md.properties, TensorProperties) and isinstance(md.properties.dtype, torch.dtype) \
                and isinstance(md.size, torch.Size) and isinstance(md.chunks, list) \
                and all(isinstance(c, ChunkStorageMetadata) for c in md.chunks)
        else:
            ok = isinstance(md, BytesStorageMetadata)
        if not isinstance(key, str) or not ok:
            bad(f"entry {key!r:.80} is malformed")
    for index, info in meta.storage_data.items():
        name = getattr(info, "relative_path", None)
        if not isinstance(index, MetadataIndex) or type(info).__name__ != "_StorageInfo" \
                or not isinstance(info.offset, int) or not isinstance(info.length, int):
            bad(f"storage entry {index!r:.80} is malformed")
        if not plain_name(name):
            bad(f"it names a data file outside the checkpoint: {name!r:.100}")
    if meta.storage_meta is not None and not isinstance(meta.storage_meta, StorageMeta):
        bad("storage_meta is malformed")


def read_dcp_metadata(ckpt: Path) -> Metadata:
    """The checked DCP metadata of checkpoint `ckpt`; CheckpointError (one line, naming the file and what it
    refers to) for anything DCP does not write there."""
    path = Path(ckpt) / METADATA
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read DCP metadata {path}: {e.strerror}") from None
    try:
        meta = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing DCP metadata {path}: {e} (phiforge never runs code a checkpoint "
                              "carries)") from None
    except Exception as e:  # truncated or mangled: the pickle machinery raises many kinds
        raise CheckpointError(f"DCP metadata {path} is damaged: {type(e).__name__}: {str(e)[:200]}") from None
    _check_structure(meta, path)
    return meta


class CheckedReader(FileSystemReader):
    """DCP's FileSystemReader, reading `.metadata` through read_dcp_metadata (once) and no per-rank metadata."""

    def __init__(self, ckpt: Path):
        super().__init__(str(ckpt))
        self.ckpt = Path(ckpt)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.ckpt} has no {METADATA} (phiforge does not read per-rank metadata)")
        if self._metadata is None:
            self._metadata = read_dcp_metadata(self.ckpt)
            if self._metadata.storage_meta is None:
                self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class CheckedPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor items with torch.load(weights_only=True)."""

    def __init__(self, ckpt: Path):
        super().__init__()
        self.ckpt = Path(ckpt)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from phiforge.model_files import load_torch_file

        loaded = load_torch_file(value, f"item {read_item.dest_index.fqn} of DCP checkpoint {self.ckpt}")
        checked = io.BytesIO()  # the default planner puts it in place; what it unpickles now is ours
        torch.save(loaded, checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


def load_dcp(state_dict: dict, ckpt: Path, no_dist: bool = False) -> None:
    """dcp.load into `state_dict` from checkpoint `ckpt` through CheckedReader and CheckedPlanner. The metadata is
    read and checked first; every failure is a CheckpointError naming the checkpoint."""
    reader = CheckedReader(ckpt)
    reader.read_metadata()
    try:
        dcp.load(state_dict, storage_reader=reader, planner=CheckedPlanner(ckpt), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        causes = [exc for exc, _ in getattr(e, "failures", {}).values()]  # each failed rank's own exception
        if causes and isinstance(causes[0], PhiforgeError):
            raise CheckpointError(str(causes[0])) from None
        raise CheckpointError(f"cannot load {ckpt}: {_first_line(causes[0] if causes else e)}") from e


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    return lines[0][:300]
