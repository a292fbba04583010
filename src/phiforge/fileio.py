"""Crash-safe writes, and the rule for the directories commands write.

Small files: write a temporary file, fsync it, rename it over the target, fsync the folder. A reader then sees
either the old file or the new one, never a half-written one, even after a power cut.

Output directories: claim_output_dir / output_dir / open_output_dir below (one rule for every command)."""

from __future__ import annotations

import json
import os
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


def read_user_mapping(path: str | Path, error: type[Exception], what: str, missing: str | None = None) -> dict:
    """A YAML (or, by its .json suffix, JSON) file a user named that must hold a mapping ({} when empty); every
    problem is `error` naming WHAT and PATH (see read_user_text)."""
    import yaml

    from phiforge.config import load_yaml

    text = read_user_text(path, error, what, missing)
    is_json = Path(path).suffix == ".json"
    try:
        data = json.loads(text) if is_json else load_yaml(text)
    except (ValueError, yaml.YAMLError) as e:
        raise error(f"{what} {path} is not valid {'JSON' if is_json else 'YAML'}: {str(e).splitlines()[0]}") \
            from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping at the top level")
    return data


# ---------------------------------------------------------------------------------------------
# Output directories: the one rule for every command that writes a directory
#
#   - OUT must be new, empty, or an earlier phiforge output of the same kind (its marker file says so, or it is
#     recognisably one from before the marker existed), which is then replaced;
#   - anything else needs --overwrite;
#   - an OUT that is, contains or sits inside an input (or the working directory, or home) is always refused.
# Refusal happens before any work and touches nothing.

MARKER = ".phiforge-output.json"
MARKER_FORMAT = "phiforge-output"
_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "added_tokens.json"}


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

    return all(ok(p.name) for p in d.iterdir())


# Outputs written before the marker existed, recognised by their files so earlier users are not locked out.

def _old_model(d: Path) -> bool:  # "phiforge": phiforge.checkpoint.FORMAT (not imported: it needs torch)
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


def _old_dataset(d: Path) -> bool:
    from phiforge.data.shards import FORMAT, INDEX

    return _json(d / INDEX).get("format") == FORMAT


def _never(d: Path) -> bool:  # kinds that always had the marker
    return False


# kind -> (what it is, in words; recogniser of an unmarked earlier output)
OUTPUT_KINDS = {
    "model": ("a phiforge checkpoint", _old_model),
    "hf": ("a Hugging Face export (`convert to-hf`)", _old_hf),
    "litgpt": ("a LitGPT export (`convert to-litgpt`)", _old_litgpt),
    "vision-synth": ("a `vision synth` dataset", _old_vision_synth),
    "study-work": ("a study's work directory", _old_study_work),
    "study-report": ("a study report", _old_study_report),
    "dataset": ("a phiforge dataset", _old_dataset),
    "tokenizer": ("a trained tokenizer (`tokenizer train`)", _never),
}


def output_kind(d: Path) -> str | None:
    """The kind the marker in d names (None without a readable marker)."""
    meta = _json(Path(d) / MARKER)
    return meta.get("kind") if meta.get("format") == MARKER_FORMAT else None


def is_output_of(d: Path, kind: str) -> bool:
    """d (an existing directory) is an earlier output of `kind`: its marker says so, or its files do."""
    found = output_kind(d)
    return found == kind if found is not None else OUTPUT_KINDS[kind][1](d)


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


def claim_output_dir(out: Path, kind: str, inputs=(), overwrite: bool = False,
                     overwrite_hint: str = "pass --overwrite to replace it (deleting what it holds) or choose "
                                           "another path") -> Path:
    """Check that `out` may be written as an output of `kind` (see the rule above); return its resolved path.

    Raises PhiforgeError, having touched nothing, when it may not. `inputs`: paths the command reads."""
    from phiforge.errors import PhiforgeError

    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    real = Path(out).expanduser().resolve()
    for inp in inputs:
        if inp is None:
            continue
        rel = _relation(real, Path(inp).expanduser().resolve())
        if rel:
            raise PhiforgeError(f"output {out} {rel} the input {inp}; choose an output outside it (refused even "
                                "with --overwrite)")
    for name, protected in (("the working directory", Path.cwd().resolve()), ("your home directory", _home())):
        if protected is not None and protected.is_relative_to(real):
            raise PhiforgeError(f"output {out} {'is' if protected == real else 'contains'} {name}; choose a "
                                "directory of its own (refused even with --overwrite)")
    if not real.exists():
        return real
    if not real.is_dir():
        raise PhiforgeError(f"output {out} is a file, not a directory; remove it or choose another path")
    what = OUTPUT_KINDS[kind][0]
    if overwrite or not any(real.iterdir()) or is_output_of(real, kind):
        return real
    found = output_kind(real)
    if found is not None and found in OUTPUT_KINDS:
        raise PhiforgeError(f"{out} holds {OUTPUT_KINDS[found][0]}, not {what}; {overwrite_hint}")
    raise PhiforgeError(f"{out} is not empty and is not {what}; {overwrite_hint}")


def write_marker(d: Path, kind: str) -> None:
    from phiforge import __version__

    write_json_atomic(Path(d) / MARKER, {"format": MARKER_FORMAT, "kind": kind, "phiforge_version": __version__})


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


@contextmanager
def output_dir(out: Path, kind: str, inputs=(), overwrite: bool = False):
    """Claim `out` (claim_output_dir), yield a fresh hidden sibling directory to write into, then mark it, make it
    readable and swap it in for `out`. A crash or an error leaves `out` as it was (and no stale files in the new
    one)."""
    real = claim_output_dir(out, kind, inputs, overwrite)
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-", dir=real.parent))
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
    empty it when --overwrite takes over someone else's directory, create it and mark it. Returns its path."""
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

    A second process is refused at once: `acquire()` raises `error` naming the holder's pid. The lock file sits
    beside the directory, not in it, so a refused or failed start leaves the directory byte-identical; a killed
    holder's lock is released by the kernel and its stale file is reused by the next run."""

    def __init__(self, target: Path, what: str, error: type[Exception] | None = None):
        from phiforge.errors import PhiforgeError

        target = Path(target).expanduser().resolve()
        self.target, self.what, self.error = target, what, error or PhiforgeError
        self.path = target.parent / f".{target.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
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
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it, so a waiter re-checks the inode
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
