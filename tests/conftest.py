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


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("phiforge: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
