"""A prepared phiforge token dataset -> litdata chunks that `litgpt.data.LitData` (and `litgpt pretrain`) read.

The tokens are phiforge's own: the documents were cleaned and tokenized by `phiforge prepare` (one pipeline,
one tokenizer), and this step only re-cuts the same token stream into the windows phiforge trains on:

    OUT/train/    litdata chunks (TokensLoader format): the rows of the batches phiforge's PackedLoader serves
                  for (seq_len, micro_batch_size, seed[, mixture]), epoch after epoch, in its order -- window w
                  of a stream is tokens[w*seq_len : w*seq_len + seq_len + 1]
    OUT/val/      every validation window in order, so LitGPT's first k validation batches are phiforge's
    OUT/tokenizer.json
    OUT/litgpt-data.json   manifest: the source dataset, seq_len, seed, epochs, window counts (written last)

LitData reads blocks of max_seq_length + 1 = seq_len + 1 tokens, so each window comes back as one sample.
Read unshuffled (`phiforge.litgpt.datamodule.PhiforgeLitData`, what `phiforge litgpt pretrain` uses) both
trainers see the same batches in the same order; stock `LitData` shuffles them again, which is also fine.
The chunks are written in-process with litdata's `BinaryWriter`, the writer `litdata.optimize` runs in its
workers (same format, no worker processes).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from phiforge.config import read_user_mapping
from phiforge.data.loader import PackedLoader, count_windows, eval_batches
from phiforge.data.shards import INDEX, open_token_dataset
from phiforge.errors import DataError
from phiforge.fileio import write_json_atomic

MANIFEST = "litgpt-data.json"
FORMAT = "phiforge-litdata"
VERSION = 1
CHUNK_BYTES = 64 * 2**20
SPLITS = ("train", "val")


def _import_litdata():
    try:
        from litdata.streaming.item_loader import TokensLoader
        from litdata.streaming.writer import BinaryWriter
    except ImportError as e:
        raise DataError(f"litdata is not installed ({e.name}); install the extra: pip install 'phiforge[litgpt]'") \
            from None
    return BinaryWriter, TokensLoader


def read_manifest(litdata_dir: str | Path) -> dict:
    path = Path(litdata_dir) / MANIFEST
    m = read_user_mapping(path, DataError, "litdata manifest", missing=f"no {MANIFEST} in {litdata_dir}; make it "
                          f"with `phiforge litgpt prepare --out {litdata_dir} ...`")
    if m.get("format") != FORMAT:
        raise DataError(f"{path} is not a phiforge litdata manifest")
    if int(m.get("version", 0)) > VERSION:
        raise DataError(f"{path} has version {m.get('version')}; this phiforge reads up to {VERSION}: upgrade it")
    return m


def _check_out(out: Path, source: Path) -> None:
    """Only an empty directory or one this command wrote (it has the manifest) is written into."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory")
    entries = {p.name for p in out.iterdir()}
    if entries and MANIFEST not in entries and entries - {"phiforge"}:
        raise DataError(f"{out} is not empty and was not written by `phiforge litgpt prepare`; choose another --out")
    if source.resolve() == out.resolve():
        raise DataError("--out must differ from the phiforge dataset directory")


def _write_split(tmp_dir: Path, windows, dtype: np.dtype) -> dict:
    BinaryWriter, TokensLoader = _import_litdata()
    writer = BinaryWriter(str(tmp_dir), chunk_bytes=CHUNK_BYTES, item_loader=TokensLoader())
    n = tokens = 0
    for arr in windows:
        writer[n] = np.ascontiguousarray(arr, dtype=dtype)
        n += 1
        tokens += len(arr)
    writer.done()
    writer.merge()
    for leftover in tmp_dir.glob("*.index.json"):  # per-rank index parts, merged into index.json
        leftover.unlink()
    return {"windows": n, "tokens": tokens}


def prepare_litdata(dataset_dir: str | Path, out_dir: str | Path, seq_len: int, micro_batch_size: int = 1,
                    seed: int = 0, epochs: int = 1, mixture=None, eval_batches_n: int | None = None) -> dict:
    """Write OUT/train, OUT/val and the manifest from a phiforge dataset directory; returns the manifest.

    The training windows are the rows of the batches phiforge's `PackedLoader(seq_len, micro_batch_size, seed,
    mixture)` serves, for `epochs` of its epochs (a nominal epoch with a mixture), so LitGPT reading them in
    order gets phiforge's batches whatever the loader's shuffling. Validation: every window of the split in
    order (phiforge's `eval_batches` takes a prefix of them); with a mixture, exactly the eval_batches_n batches
    phiforge evaluates on."""
    t0 = time.perf_counter()
    src, out = Path(dataset_dir), Path(out_dir)
    if epochs < 1:
        raise DataError(f"--epochs must be at least 1, got {epochs}")
    ds = open_token_dataset(src)
    for split in SPLITS:
        if split not in ds.splits():
            raise DataError(f"dataset {src} has no '{split}' split (it has: {', '.join(ds.splits())})")
    if mixture is not None and not eval_batches_n:
        raise DataError("with a mixture, give the number of validation batches phiforge evaluates (--eval-batches)")
    _check_out(out, src)
    loader = PackedLoader(src, "train", seq_len, micro_batch_size, seed=seed, mixture=mixture)
    val = _val_windows(ds, seq_len, micro_batch_size, mixture, eval_batches_n)
    splits = _write_splits(src, out, ds, {"train": _train_windows(loader, epochs * loader.batches_per_epoch),
                                          "val": val})
    splits["train"].update(epochs=epochs, windows_per_epoch=loader.batches_per_epoch * micro_batch_size,
                           split_tokens=ds.split_tokens("train"))
    splits["val"].update(split_tokens=ds.split_tokens("val"))
    manifest = {
        "format": FORMAT, "version": VERSION, "source_dataset": str(src.resolve()),
        "source_index_sha256": hashlib.sha256((src / INDEX).read_bytes()).hexdigest(),
        "prepared": ds.index.get("prepared", {}), "tokenizer": ds.index["tokenizer"], "dtype": ds.index["dtype"],
        "seq_len": seq_len, "block_size": seq_len + 1, "micro_batch_size": micro_batch_size, "seed": seed,
        "mixture": loader.mixture, "eval_batches": eval_batches_n,
        "order": "phiforge PackedLoader batches (world_size 1)", "splits": splits,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _train_windows(loader: PackedLoader, n_batches: int):
    """The rows of the loader's next n_batches batches (the batches phiforge trains on, in its order)."""
    for _ in range(n_batches):
        x, y = loader.next_batch()
        yield from torch.cat([x, y[:, -1:]], dim=1).numpy()


def _val_windows(ds, seq_len: int, micro_batch_size: int, mixture, eval_batches_n: int | None):
    """Every validation window in order; with a mixture, the eval_batches_n batches phiforge evaluates on."""
    if mixture is not None:
        for x, y in eval_batches(ds.dir, "val", seq_len, micro_batch_size, eval_batches_n, mixture=mixture):
            yield from torch.cat([x, y[:, -1:]], dim=1).numpy()
        return
    stream = ds.stream("val")
    for w in range(count_windows(stream, seq_len, f"split 'val' of {ds.dir}")):
        yield stream.read(w * seq_len, seq_len + 1)


def _write_splits(src: Path, out: Path, ds, windows: dict) -> dict:
    """Each split's windows as litdata chunks in OUT/SPLIT (replacing an earlier one only once all are written),
    and the dataset's tokenizer.json; {split: {"windows", "tokens"}}."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".litdata.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (out / MANIFEST).unlink(missing_ok=True)  # no manifest while the splits are being replaced
        splits = {}
        for split, gen in windows.items():
            (tmp / split).mkdir()
            splits[split] = _write_split(tmp / split, gen, ds.dtype)
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
            (tmp / split).rename(out / split)
        tok = src / "tokenizer.json"
        if tok.is_file():
            shutil.copyfile(tok, out / "tokenizer.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return splits


def check_manifest_fits(manifest: dict, litdata_dir: Path, seq_len: int, micro_batch_size: int) -> list[str]:
    """Problems (errors) and notes for training on `litdata_dir` with these settings; raises DataError on errors."""
    if int(manifest["seq_len"]) != seq_len:
        raise DataError(f"{litdata_dir} was cut into windows of seq_len {manifest['seq_len']}, this run has seq_len "
                        f"{seq_len}: re-run `phiforge litgpt prepare --seq-len {seq_len}`")
    notes = []
    if int(manifest.get("micro_batch_size", 1)) != micro_batch_size:
        notes.append(f"{litdata_dir} was ordered for micro_batch_size {manifest.get('micro_batch_size')}; "
                     f"past the first epoch the order differs from phiforge's with {micro_batch_size}")
    return notes
