"""fileio.DirectoryLock: one writer per output directory; a second process is refused with the holder's pid."""

import os
import subprocess
import sys
import textwrap

import pytest

from phiforge.errors import PhiforgeError
from phiforge.fileio import DirectoryLock


def test_second_holder_is_refused_naming_the_pid(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from phiforge.fileio import DirectoryLock
        lock = DirectoryLock({str(out)!r}, "output").acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(PhiforgeError, match=rf"output .*out is in use by another phiforge process \(pid "
                                                 rf"{holder.pid}\)"):
            DirectoryLock(out, "output").acquire()
        assert not out.exists()  # the lock sits beside the directory, never in it
    finally:
        holder.kill()
        holder.wait()
    with DirectoryLock(out, "output") as lock:  # a killed holder's lock is free again
        assert lock.path.read_text().strip().isdigit()
    assert not lock.path.exists()


def test_lock_released_and_reacquired_in_process(tmp_path):
    a = DirectoryLock(tmp_path / "x", "run directory").acquire()
    a.release()
    assert not a.path.exists()
    b = DirectoryLock(tmp_path / "x", "run directory").acquire()
    assert b.path.read_text().strip() == str(os.getpid())
    b.release()


def test_lock_is_reentrant_within_a_process(tmp_path):
    outer = DirectoryLock(tmp_path / "x", "output", reentrant=True).acquire()
    with pytest.raises(PhiforgeError, match=rf"in use by another phiforge process \(pid {os.getpid()}\)"):
        DirectoryLock(tmp_path / "x", "output").acquire()  # a claim that is not reentrant is refused in-process too
    inner = DirectoryLock(tmp_path / "x", "output", reentrant=True).acquire()  # `data merge` locks OUT, then
    inner.release()                                                             # output_dir does
    assert outer.path.exists()  # still held by the outer one
    holder = subprocess.run([sys.executable, "-c", f"from phiforge.fileio import DirectoryLock; "
                             f"DirectoryLock({str(tmp_path / 'x')!r}, 'output').acquire()"],
                            capture_output=True, text=True)
    assert holder.returncode != 0 and f"pid {os.getpid()}" in holder.stderr
    outer.release()
    assert not outer.path.exists()
