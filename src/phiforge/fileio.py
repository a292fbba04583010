"""Crash-safe writes, and the rule for the directories commands write.

Small files: write a temporary file, fsync it, rename it over the target, fsync the folder. A reader then sees
either the old file or the new one, never a half-written one, even after a power cut.

Output directories: claim_output_dir / output_dir / open_output_dir below (one rule for every command)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(d: Path) -> None:
    """Make a rename inside `d` durable (a no-op where the platform or filesystem cannot open folders)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def plain_name(name, subfolders: bool = False) -> bool:
    """`name`, read from a file that names another file, stays in that file's folder: a plain file name (with
    `subfolders`, a relative path such as rng/rank-00000.pt), never absolute, empty, `.`, `..` or through `..`."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        return False
    parts = name.split("/")
    return (subfolders or len(parts) == 1) and all(p not in ("", ".", "..") for p in parts)


def read_user_text(path: str | Path, error: type[Exception], what: str, missing: str | None = None) -> str:
    """The UTF-8 text of a file a user named. A missing file raises `error(missing)` (default "WHAT not found:
    PATH"); a folder, an unreadable or a non-UTF-8 file raises `error("cannot read WHAT PATH: why")`."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(missing or f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {what} {path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Output directories: the one rule for every command that writes a directory
#
#   - OUT must be new, empty, or an earlier phiforge output of the same kind, which is then replaced. Its marker
#     file says so and lists every file written with its size (and the sha256 of small files): OUT is replaceable
#     only while it holds exactly those files, unchanged (files removed since are fine). An output from before
#     the marker (or its file list) existed is recognised by its file names;
#   - anything else needs --overwrite;
#   - an OUT that is, contains or sits inside an input (or the working directory, or home) is always refused;
#   - OUT (when it exists) and the folder it is written in must be writable.
# Refusal happens before any work and touches nothing. Outputs written in place over several steps (a study's work
# and report directories, IN_PLACE_KINDS) are never replaced, only added to: files beside them are kept.

MARKER = ".phiforge-output.json"
MARKER_FORMAT = "phiforge-output"
_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "added_tokens.json"}
IN_PLACE_KINDS = {"study-work", "study-report", "run"}
HASHED_BYTES = 4 * 2**20  # files up to this size are recorded with their sha256 as well as their size


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _names_in(d: Path, names=(), suffixes=(), tokenizer: bool = False, weights: bool = False) -> bool:
    """Every entry of d is one of `names`, ends with one of `suffixes`, or is a tokenizer or weight file."""
    def ok(n: str) -> bool:
        return n in names or n.endswith(tuple(suffixes)) or (tokenizer and n in _TOKENIZER_FILES) or \
            (weights and (n.endswith(".safetensors") or n == "model.safetensors.index.json"))

    return all(ok(p.name) for p in d.iterdir() if p.name != MARKER)


# Outputs written before the marker existed, recognised by their files so earlier users are not locked out.

def _old_model(d: Path) -> bool:  # "phiforge": phiforge.model_files.FORMAT (not imported: it needs torch)
    return _json(d / "config.json").get("format") == "phiforge" and \
        _names_in(d, ["config.json"], tokenizer=True, weights=True)


def _old_hf(d: Path) -> bool:
    return _json(d / "config.json").get("model_type") == "phi" and (d / "generation_config.json").is_file() and \
        _names_in(d, ["config.json", "generation_config.json"], tokenizer=True, weights=True)


def _old_litgpt(d: Path) -> bool:
    return (d / "lit_model.pth").is_file() and \
        _names_in(d, ["lit_model.pth", "model_config.yaml", "prompt_style.yaml"], tokenizer=True)


def _old_vision_synth(d: Path) -> bool:
    return {"seed", "size", "train", "heldout"} <= set(_json(d / "info.json")) and \
        _names_in(d, ["images", "train.json", "heldout.json", "info.json"])


def _old_study_work(d: Path) -> bool:
    names = {p.name for p in d.iterdir()}
    return ("study-state.json" in names or {"configs", "data"} <= names) and \
        _names_in(d, ["data", "init", "runs", "configs", "study-state.json"], suffixes=[".log"])


def _old_study_report(d: Path) -> bool:  # other files beside a report are kept: it is rewritten in place
    return "study" in _json(d / "results.json") and (d / "report.md").is_file()


def _old_dataset(d: Path) -> bool:  # data.shards' INDEX and FORMAT (not imported: fileio sits below the data layer)
    return _json(d / "index.json").get("format") == "phiforge-tokens"


def _old_tokenizer(d: Path) -> bool:  # written with a marker from the start, but not yet with its file list
    return output_kind(d) == "tokenizer" and _names_in(d, ["tokenizer-train.json"], tokenizer=True)


def _old_run(d: Path) -> bool:  # "phiforge-train-state": train.checkpointing.STATE_FORMAT (not imported: torch)
    """A training run from before the marker: a checkpoint's train_state.json, or metrics.jsonl opening with a
    run's "start" event. A run may hold the user's own files too: --overwrite deletes only the run's
    (train.rundir.run_files)."""
    states = (d / "checkpoints").glob("step-*/train_state.json") if (d / "checkpoints").is_dir() else ()
    if any(_json(p).get("format") == "phiforge-train-state" for p in states):
        return True
    try:
        with open(d / "metrics.jsonl", encoding="utf-8") as f:
            first = json.loads(f.readline(1 << 16))
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and first.get("event") == "start"


# kind -> (what it is, in words; recogniser of an unmarked earlier output)
OUTPUT_KINDS = {
    "model": ("a phiforge checkpoint", _old_model),
    "hf": ("a Hugging Face export (`convert to-hf`)", _old_hf),
    "litgpt": ("a LitGPT export (`convert to-litgpt`)", _old_litgpt),
    "vision-synth": ("a `vision synth` dataset", _old_vision_synth),
    "study-work": ("a study's work directory", _old_study_work),
    "study-report": ("a study report", _old_study_report),
    "dataset": ("a phiforge dataset", _old_dataset),
    "tokenizer": ("a trained tokenizer (`tokenizer train`)", _old_tokenizer),
    "run": ("a training run (`phiforge train`, `vision finetune`)", _old_run),
}


def output_kind(d: Path) -> str | None:
    """The kind the marker in d names (None without a readable marker)."""
    meta = _json(Path(d) / MARKER)
    return meta.get("kind") if meta.get("format") == MARKER_FORMAT else None


def _record(entry: os.DirEntry) -> dict:
    """A file's size, and the sha256 of a small one (a link: its own size, not followed)."""
    size = entry.stat(follow_symlinks=False).st_size
    if size > HASHED_BYTES or not entry.is_file(follow_symlinks=False):
        return {"size": size}
    return {"size": size, "sha256": sha256_file(Path(entry.path))}


def _listing(d: Path, sub: str = "") -> tuple[dict[str, dict], list[str]]:
    """(relative path -> _record for every file, every folder's relative path) under d, the marker left out."""
    files, folders = {}, []
    for entry in sorted(os.scandir(d / sub), key=lambda e: e.name):
        rel = f"{sub}{entry.name}"
        if rel == MARKER:
            continue
        if entry.is_dir(follow_symlinks=False):
            folders.append(rel)
            more_files, more_folders = _listing(d, rel + "/")
            files.update(more_files)
            folders += more_folders
        else:
            files[rel] = _record(entry)
    return files, folders


def _unlisted(d: Path, files: dict, folders: set, sub: str = "") -> list[str]:
    """What under d is not in the marker's lists (a folder once, as NAME/) or differs from its record."""
    found = []
    for entry in sorted(os.scandir(d / sub), key=lambda e: e.name):
        rel = f"{sub}{entry.name}"
        if rel == MARKER:
            continue
        if entry.is_dir(follow_symlinks=False):
            found += _unlisted(d, files, folders, rel + "/") if rel in folders else [rel + "/"]
        elif rel not in files:
            found.append(rel)
        elif _record(entry) != files[rel]:
            found.append(f"{rel} (changed)")
    return found


def _marker_lists(d: Path, kind: str) -> tuple[dict, set] | None:
    """The file and folder lists of d's marker when it marks an output of `kind` and has them, else None."""
    meta = _json(d / MARKER)
    files, folders = meta.get("files"), meta.get("folders")
    if output_kind(d) != kind or not isinstance(files, dict) or not isinstance(folders, list):
        return None
    return files, set(folders)


def _not_replaceable(d: Path, kind: str) -> str | None:
    """Why existing, non-empty directory d is not an earlier output of `kind` that may be replaced (None: it is)."""
    what = OUTPUT_KINDS[kind][0]
    found = output_kind(d)
    if found is not None and found != kind:
        return f"holds {OUTPUT_KINDS[found][0]}, not {what}" if found in OUTPUT_KINDS else f"is not {what}"
    lists = _marker_lists(d, kind)
    if lists is not None:
        extra = _unlisted(d, *lists)
        if extra:
            shown = ", ".join(extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
            return f"is {what} but also holds files phiforge did not write there: {shown}"
        return None
    if found == kind and kind in IN_PLACE_KINDS:
        return None
    return None if OUTPUT_KINDS[kind][1](d) else f"is not empty and is not {what}"


def is_output_of(d: Path, kind: str) -> bool:
    """d (an existing directory) is an earlier output of `kind`: marked as one (and, where the marker lists its
    files, holding exactly those), or recognisably one from before the marker."""
    return _not_replaceable(Path(d), kind) is None


def _relation(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b.is_relative_to(a):
        return "contains"
    if a.is_relative_to(b):
        return "is inside"
    return None


def _home() -> Path | None:
    try:
        return Path("~").expanduser().resolve()
    except RuntimeError:  # no home directory can be determined
        return None


def check_output_location(out: Path, inputs=(), what: str = "output", error: type[Exception] | None = None) -> Path:
    """The resolved `out`, or `error` (PhiforgeError) when it is, contains or sits inside one of `inputs`, or is or
    contains the working directory or the home directory: refused even with --overwrite. `what`: its name in
    the message (e.g. "out_dir")."""
    from phiforge.errors import PhiforgeError

    error = error or PhiforgeError
    real = Path(out).expanduser().resolve()
    for inp in inputs:
        if inp is None:
            continue
        rel = _relation(real, Path(inp).expanduser().resolve())
        if rel:
            raise error(f"{what} {out} {rel} the input {inp}; choose an output outside it (refused even with "
                        "--overwrite)")
    for name, protected in (("the working directory", Path.cwd().resolve()), ("your home directory", _home())):
        if protected is not None and protected.is_relative_to(real):
            raise error(f"{what} {out} {'is' if protected == real else 'contains'} {name}; choose a directory of "
                        "its own (refused even with --overwrite)")
    return real


def check_writable(path: Path, error: type[Exception] | None = None, what: str = "output") -> None:
    """Raise `error` naming `path` unless it can be written: an existing `path` must be writable, and so must the
    nearest existing folder above it (where it, or the temporary it is written as, is created)."""
    from phiforge.errors import PhiforgeError

    path = Path(path).expanduser().absolute()
    if path.exists() and not os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        raise (error or PhiforgeError)(f"{what} {path} is read-only; make it writable or choose another path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK,
                                            effective_ids=os.access in os.supports_effective_ids):
        raise (error or PhiforgeError)(f"cannot write {what} {path}: {parent} is not a writable folder; make it "
                                       "writable or choose another path")


def claim_output_dir(out: Path, kind: str, inputs=(), overwrite: bool = False,
                     overwrite_hint: str = "pass --overwrite to replace it (deleting what it holds) or choose "
                                           "another path") -> Path:
    """Check that `out` may be written as an output of `kind` (see the rule above); return its resolved path.

    Raises PhiforgeError, having touched nothing, when it may not. `inputs`: paths the command reads."""
    from phiforge.errors import PhiforgeError

    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    real = check_output_location(out, inputs)
    if real.exists() and not real.is_dir():
        raise PhiforgeError(f"output {out} is a file, not a directory; remove it or choose another path")
    check_writable(real)
    if not real.exists() or overwrite or not any(real.iterdir()):
        return real
    problem = _not_replaceable(real, kind)
    if problem:
        raise PhiforgeError(f"{out} {problem}; {overwrite_hint}")
    return real


def write_marker(d: Path, kind: str) -> None:
    """Mark d as an output of `kind`; the marker of an output written whole lists its files (see the rule)."""
    from phiforge import __version__

    meta = {"format": MARKER_FORMAT, "kind": kind, "phiforge_version": __version__}
    if kind not in IN_PLACE_KINDS:
        meta["files"], meta["folders"] = _listing(Path(d))
    write_json_atomic(Path(d) / MARKER, meta)


def make_readable(d: Path) -> None:
    """0644 files and 0755 folders under d, whatever the umask and the writer (safetensors writes 0600): exports
    are read by other tools, containers and users."""
    d = Path(d)
    os.chmod(d, 0o755)
    for p in d.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, 0o755 if p.is_dir() else 0o644)


def swap_in_dir(tmp: Path, out: Path) -> None:
    """Put finished directory tmp at out, replacing what is there; on failure the old out is put back."""
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    fsync_dir(out.parent)


def _temporaries(out: Path) -> list[Path]:
    """The folders output_dir and swap_in_dir make beside `out` (`.OUT.tmp-XXXXXXXX`, `.OUT.old-XXXXXXXX`, as
    tempfile.mkdtemp names them); an `.old-` one only once OUT exists again, so the swap it belonged to finished."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-[a-z0-9_]{{8}}")
    found = []
    for p in out.parent.iterdir() if out.parent.is_dir() else []:
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and (m[1] == "tmp" or out.is_dir()):
            found.append(p)
    return found


@contextmanager
def output_dir(out: Path, kind: str, inputs=(), overwrite: bool = False):
    """Claim `out` (claim_output_dir) and lock it (DirectoryLock: one writer at a time), remove what earlier writers
    of `out` that were killed left beside it, yield a fresh hidden sibling directory to write into, then mark it,
    make it readable and swap it in for `out`. A crash or an error leaves `out` as it was (and no stale files in
    the new one); the next write of `out` removes a killed writer's temporary."""
    from phiforge.errors import PhiforgeError

    real = claim_output_dir(out, kind, inputs, overwrite)
    with DirectoryLock(real, "output", reentrant=True):
        for stale in _temporaries(real):  # the lock is ours, so whoever wrote these is gone
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-", dir=real.parent))
        except OSError as e:
            raise PhiforgeError(f"cannot write output {out}: {e.strerror} in {real.parent}") from None
        try:
            yield tmp
            write_marker(tmp, kind)
            make_readable(tmp)
            swap_in_dir(tmp, real)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def open_output_dir(out: Path, kind: str, inputs=(), overwrite: bool = False) -> Path:
    """For outputs written in place over several steps (a study's work and report directories): claim `out`,
    empty it when --overwrite takes over someone else's directory, create it and mark it. Returns its path.
    Files beside such an output are kept (it is added to, never replaced), so its marker lists no files."""
    if kind not in IN_PLACE_KINDS:
        raise ValueError(f"{kind!r} outputs are written whole (output_dir), not in place")
    real = claim_output_dir(out, kind, inputs, overwrite)
    if real.is_dir() and any(real.iterdir()) and not is_output_of(real, kind):  # only reachable with overwrite
        shutil.rmtree(real)
    real.mkdir(parents=True, exist_ok=True)
    if output_kind(real) != kind:
        write_marker(real, kind)
    return real


# ---------------------------------------------------------------------------------------------
# One writer per output: an exclusive lock beside the directory a command writes


def _lock_holder(lock_file: Path) -> str:
    try:
        pid = lock_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return "another process"
    return f"another phiforge process (pid {pid})" if pid.isdigit() else "another process"


class DirectoryLock:
    """An exclusive flock on `.NAME.lock` beside `target` (which need not exist yet), holding the holder's pid.

    A second process is refused at once: `acquire()` raises `error` naming the holder's pid. Within one process a
    `reentrant` lock may be taken again by another reentrant one (a command that locks OUT calls a writer that
    locks it too); any other second claim is refused like another process's. The lock file sits beside
    the directory, not in it, so a refused or failed start leaves the directory byte-identical; a killed holder's
    lock is released by the kernel and its stale file is reused by the next run."""

    _held: dict[Path, list] = {}  # lock file -> [fd, depth, reentrant]: the locks this process holds

    def __init__(self, target: Path, what: str, error: type[Exception] | None = None, reentrant: bool = False):
        from phiforge.errors import PhiforgeError

        target = Path(target).expanduser().resolve()
        self.target, self.what, self.error = target, what, error or PhiforgeError
        self.path = target.parent / f".{target.name}.lock"
        self.reentrant, self._mine = reentrant, False

    def acquire(self) -> "DirectoryLock":
        if self._mine:
            return self
        held = DirectoryLock._held.get(self.path)
        if held is None:
            DirectoryLock._held[self.path] = held = [self._lock_file(), 0, self.reentrant]
        elif not (held[2] and self.reentrant):
            raise self.error(f"{self.what} {self.target} is in use by {_lock_holder(self.path)}; wait for it to "
                             "finish or choose another path")
        held[1] += 1
        self._mine = True
        return self

    def _lock_file(self) -> int:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self.error(f"{self.what} {self.target} is in use by {_lock_holder(self.path)}; wait for it to "
                                 "finish or choose another path") from None
            try:  # the previous holder may have removed the file between our open and our lock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def release(self) -> None:
        if not self._mine:
            return
        self._mine = False
        held = DirectoryLock._held[self.path]
        held[1] -= 1
        if held[1]:
            return
        del DirectoryLock._held[self.path]
        try:
            self.path.unlink(missing_ok=True)  # while still holding it, so a waiter re-checks the inode
        finally:
            os.close(held[0])

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
