import pytest

from phiforge.cli import main


@pytest.fixture(scope="session")
def gutenberg_dir(tmp_path_factory):
    """The bundled books prepared once per test session (about 8 s)."""
    out = tmp_path_factory.mktemp("data") / "gutenberg"
    assert main(["prepare", "gutenberg", "--source", "bundled", "--out", str(out)]) == 0
    return out


def run_cli(capsys, *argv):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("phiforge: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
