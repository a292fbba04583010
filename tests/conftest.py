import ctypes
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from phiforge.cli import main


@pytest.fixture(scope="session")
def gutenberg_dir(tmp_path_factory):
    """The bundled books prepared once per test session (about 8 s)."""
    out = tmp_path_factory.mktemp("data") / "gutenberg"
    assert main(["prepare", "gutenberg", "--source", "bundled", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def redpajama_fixture(tmp_path_factory):
    """A small RedPajama-1T-format download (all seven sources) made from bundled books and stdlib text."""
    from data_fixtures import make_redpajama

    return make_redpajama(tmp_path_factory.mktemp("rp") / "RedPajama-1T", "1T", max_bytes=60_000)


@pytest.fixture(scope="session")
def redpajama_dir(tmp_path_factory, redpajama_fixture):
    """redpajama_fixture prepared once per session: small shards, 10% of documents held out."""
    out = tmp_path_factory.mktemp("rpdata") / "redpajama"
    assert main(["prepare", "redpajama", "--input", str(redpajama_fixture), "--out", str(out), "--val-fraction",
                 "0.1", "--shard-tokens", "4000", "--workers", "2"]) == 0
    return out


def run_cli(capsys, *argv):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(d) -> dict:
    """Every path under d with the sha256 of each file: equal snapshots mean byte-identical trees."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(d).rglob("*"))}


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("phiforge: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@contextmanager
def read_only(folder):
    """`folder` read-only for this test, also when the tests run as root: root writes anywhere through
    CAP_DAC_OVERRIDE, so it is dropped from this thread's effective capabilities for the duration (and put back)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o555)
    caps = _capabilities() if os.geteuid() == 0 else None
    if caps is not None:
        header, data = caps
        effective = data[0].effective
        data[0].effective &= ~(1 << 1)  # CAP_DAC_OVERRIDE
        assert _libc().capset(ctypes.byref(header), data) == 0, "cannot drop CAP_DAC_OVERRIDE"
    try:
        yield folder
    finally:
        if caps is not None:
            data[0].effective = effective
            assert _libc().capset(ctypes.byref(header), data) == 0
        os.chmod(folder, 0o755)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _capabilities():
    """(header, data) of this thread's capabilities (Linux capget, version 3)."""
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    assert _libc().capget(ctypes.byref(header), data) == 0
    return header, data
