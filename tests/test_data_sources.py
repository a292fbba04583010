"""Gutenberg sources (mirror tree + catalog, parquet layouts, download from a local HTTP server), cleaning and
dedup with its report, and every bad input: a one-line error naming the file, or a skip counted in the report."""

import gzip
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import pytest

from phiforge.data.download import Fetcher
from phiforge.data.gutenberg import read_text_file
from phiforge.data.mirror import CatalogFilter, MirrorGutenberg, parse_id_ranges, read_catalog, scan_mirror
from phiforge.data.report import Report
from phiforge.data.shards import open_token_dataset
from phiforge.data.sources import BUNDLED_DIR
from phiforge.errors import DataError

from conftest import assert_one_line_error, run_cli

HEADER = ("The Project Gutenberg EBook of {t}\n\nTitle: {t}\n\nLanguage: English\n\n"
          "*** START OF THIS PROJECT GUTENBERG EBOOK {T} ***\n\nProduced by Someone\n\n\n")
FOOTER = "\n\n\nEnd of the Project Gutenberg EBook of {t}\n\n*** END OF THIS PROJECT GUTENBERG EBOOK {T} ***\n" \
         "\nlicence text " * 3


def _book(name, chars=40_000):
    return read_text_file(BUNDLED_DIR / f"{name}.txt.gz")[:chars].rsplit("\n\n", 1)[0] + "\n"


def _gutenberg_file(title, body, crlf=False):
    text = HEADER.format(t=title, T=title.upper()) + body + FOOTER.format(t=title, T=title.upper())
    return text.replace("\n", "\r\n") if crlf else text


def _rewrap(text, width=50):
    """Another edition: the same words wrapped at another width, with a few words changed."""
    out = []
    for para in text.split("\n\n"):
        words = para.split()
        line, lines = [], []
        for w in words:
            if sum(map(len, line)) + len(line) + len(w) > width:
                lines.append(" ".join(line))
                line = []
            line.append(w)
        lines.append(" ".join(line))
        out.append("\n".join(lines))
    return "\n\n".join(out).replace("Elizabeth", "Eliza", 3)


CATALOG = """Text#,Type,Issued,Title,Language,Authors,Subjects,LoCC,Bookshelves
1342,Text,1998-06-01,Pride and Prejudice,en,"Austen, Jane",Fiction,PR,Best Books
1343,Text,1998-06-02,Pride and Prejudice (again),en,"Austen, Jane",,,
1344,Text,2020-01-01,"Pride and Prejudice, another edition",en,"Austen, Jane",,,
105,Text,1994-03-01,Persuasion,en,"Austen, Jane",,,
121,Text,1994-04-01,Northanger Abbey,en,"Austen, Jane",,,
999,Text,2005-01-01,Un livre,fr,Anonyme,,,
888,Sound,2005-01-01,An audio book,en,Someone,,,
500,Text,2005-01-01,Empty,en,Nobody,,,
501,Text,2005-01-01,Binary,en,Nobody,,,
,Text,2005-01-01,No number,en,Nobody,,,
777,Text,2005-01-01,No language,,Nobody,,,
"""


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror") / "gutenberg"
    pp = _book("pg1342_pride_and_prejudice")

    def put(rel, data):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))

    put("1/3/4/1342/1342-0.txt", _gutenberg_file("Pride and Prejudice", pp))  # digit-nested layout, UTF-8
    put("cache/epub/1342/pg1342.txt.utf8", _gutenberg_file("Pride and Prejudice", pp))  # a second copy
    put("1343/1343-0.txt", _gutenberg_file("Pride and Prejudice", pp, crlf=True))  # same book again: exact dup
    put("1344/1344-0.txt", _gutenberg_file("Pride and Prejudice, another edition", _rewrap(pp)))  # near dup
    persuasion = _book("pg105_persuasion") + "\nA caf\u00e9 in Bath, na\u00efve.\n"
    put("105/105-8.txt", _gutenberg_file("Persuasion", persuasion).encode("cp1252"))  # old 8-bit file
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("121.txt", _gutenberg_file("Northanger Abbey", _book("pg121_northanger_abbey")))
    put("121/121.zip", z.getvalue())
    put("999/999-0.txt", _gutenberg_file("Un livre", "Il \u00e9tait une fois.\n" * 50))  # French: filtered out
    put("888/888-0.txt", "an audio book's readme\n")  # type Sound: filtered out
    put("2701/2701-0.txt", _gutenberg_file("Moby Dick", _book("pg2701_moby_dick_raw", 5_000)))  # not in catalog
    put("500/500-0.txt", b"")  # empty
    put("501/501-0.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)  # binary
    put("old/etext90/plboss10.txt", "not matched: no number in the name\n")
    put("1342/1342-h/1342-h.htm", "<html>not a text file</html>")
    put("pg_catalog.csv", CATALOG)
    return root


def test_scan_prefers_utf8_and_finds_nested_layouts(mirror):
    found = scan_mirror(mirror)
    assert found["1342"] == [(0, "1/3/4/1342/1342-0.txt"), (2, "cache/epub/1342/pg1342.txt.utf8")]
    assert found["105"] == [(4, "105/105-8.txt")] and found["121"] == [(7, "121/121.zip")]
    assert "10" not in found and "plboss10" not in str(found)
    assert parse_id_ranges("1-100,2701, 5000-") == [(1, 100), (2701, 2701), (5000, 10**12)]
    with pytest.raises(DataError, match="--ids"):
        parse_id_ranges("x-3")


def test_catalog_rows_with_missing_fields_are_counted(mirror, tmp_path):
    rep = Report()
    cat = read_catalog(mirror / "pg_catalog.csv", rep)
    assert "1342" in cat and cat["999"].languages == ("fr",) and "777" not in cat
    r = rep.removed["catalog row with missing fields"]
    assert r["count"] == 2 and any("pg_catalog.csv:11: no Text#" in e for e in r["examples"])
    assert any("pg_catalog.csv:12: no Language" in e for e in r["examples"])
    bad = tmp_path / "cat.csv"
    bad.write_text("Text#,Title\n1,x\n")
    with pytest.raises(DataError, match=f"catalog {bad} lacks column\\(s\\) Type, Language"):
        read_catalog(bad, Report())


def test_prepare_mirror_cleans_dedups_filters_and_reports(capsys, mirror, tmp_path):
    out = tmp_path / "ds"
    code, stdout, err = run_cli(capsys, "prepare", "gutenberg", "--source", "mirror", "--mirror", mirror,
                                "--catalog", mirror / "pg_catalog.csv", "--language", "en", "--val-ids", "121",
                                "--out", out, "--workers", "2")
    assert code == 0, err
    ds = open_token_dataset(out)
    docs = {d["id"]: d for d in ds.iter_documents()}
    assert sorted(docs) == ["105", "121", "1342"]
    assert docs["1342"]["title"] == "Pride and Prejudice" and docs["121"]["split"] == "val"
    assert docs["1342"]["removed_header_chars"] > 100 and docs["1342"]["removed_footer_chars"] > 100
    rep = json.loads((out / "prepare-report.json").read_text())
    removed = rep["removed"]
    assert removed["exact duplicate"]["count"] == 1 and "1343" in removed["exact duplicate"]["examples"][0]
    near = removed["near duplicate"]
    assert near["count"] == 1 and near["examples"][0].startswith("1344 (Pride and Prejudice, another edition) ~ 1342")
    assert removed["other copy of the same book"]["count"] == 1
    assert removed["not in catalog"]["count"] == 1 and "2701" in removed["not in catalog"]["examples"][0]
    assert removed["filtered out by catalog (language/type/ids)"]["count"] == 2
    assert removed["empty file"]["count"] == 1 and "500/500-0.txt" in removed["empty file"]["examples"][0]
    assert removed["binary file"]["count"] == 1 and "501/501-0.txt" in removed["binary file"]["examples"][0]
    assert removed["catalog row with missing fields"]["count"] == 2
    assert rep["cleaning"]["encoding_fallback"] == {"cp1252": 1} and rep["cleaning"]["documents_with_markers"] == 3
    assert rep["kept"]["documents"] == 3
    # the printed summary names the reasons with an example
    assert "removed 1 x near duplicate (e.g. 1344" in stdout and "report:" in stdout
    # the 8-bit book was decoded, cleaned and kept its accents
    tok = ds.stream("train")
    from phiforge.tokenizer import builtin_tokenizer

    p = docs["105"]
    text = builtin_tokenizer().decode(tok.read(p["offset"], p["tokens"] - 1).tolist())
    assert text.startswith("Persuasion") and "caf\u00e9 in Bath, na\u00efve." in text and "Gutenberg" not in text


def test_mirror_without_catalog_takes_ids_and_titles_from_headers(mirror, tmp_path):
    src = MirrorGutenberg(mirror, filter=CatalogFilter(types=None, ids=parse_id_ranges("100-200,1342")))
    assert src.ids() == ["105", "121", "1342"]
    from phiforge.data.prepare import prepare

    out = tmp_path / "ds"
    prepare(src, out, ["121"], workers=0, dedup="none")
    titles = {d["id"]: d["title"] for d in open_token_dataset(out).iter_documents()}
    assert titles == {"105": "Persuasion", "121": "Northanger Abbey", "1342": "Pride and Prejudice"}


# ---------------------------------------------------------------------------------------------- parquet


def test_parquet_layouts(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path / "pq"
    d.mkdir()
    emma, moby = _book("pg158_emma", 20_000), _book("pg2701_moby_dick_raw", 30_000)
    pers, nor = _book("pg105_persuasion", 20_000), _book("pg121_northanger_abbey", 20_000)
    pq.write_table(pa.table({"id": ["158", "2701"], "text": [emma, moby]}), d / "manu-0.parquet", row_group_size=1)
    meta = json.dumps({"text_id": 105, "title": "Persuasion", "authors": "Austen, Jane", "language": "en"})
    pq.write_table(pa.table({"TEXT": [pers, ""], "SOURCE": ["gutenberg", "gutenberg"],
                             "METADATA": [meta, json.dumps({"text_id": 9})]}), d / "sedthh-0.parquet")
    pq.write_table(pa.table({"short_book_title": ["Northanger Abbey"], "publication_date": [1817],
                             "url": ["http://www.gutenberg.org/ebooks/121"], "text": [nor]}), d / "pg19-0.parquet")
    out = tmp_path / "ds"
    code, stdout, err = run_cli(capsys, "prepare", "gutenberg", "--source", "parquet", "--parquet", d,
                                "--val-ids", "121", "--out", out, "--workers", "0")
    assert code == 0, err
    docs = {x["id"]: x for x in open_token_dataset(out).iter_documents()}
    assert sorted(docs) == ["105", "121", "158", "2701"]
    assert docs["105"]["title"] == "Persuasion" and docs["105"]["authors"] == "Austen, Jane"
    assert docs["121"]["title"] == "Northanger Abbey" and docs["121"]["split"] == "val"
    assert docs["2701"]["removed_header_chars"] > 500  # the Gutenberg header in the dump's text is cut
    rep = json.loads((out / "prepare-report.json").read_text())
    assert rep["read"]["units"] == 4  # manu: 2 row groups; sedthh, pg19: 1 each
    assert rep["removed"]["empty document"]["count"] == 1
    (d / "other.parquet").write_bytes(b"PAR1 not really")
    code, _, err = run_cli(capsys, "prepare", "gutenberg", "--source", "parquet", "--parquet", d, "--out",
                           tmp_path / "x")
    assert_one_line_error(code, err, "cannot read parquet file", "other.parquet")


# ---------------------------------------------------------------------------------------------- download


class _Mirror(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    faults: dict = {}  # path -> list of "503" / "cut" to apply to the next requests
    log: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.log.append((self.path, self.headers.get("Range")))
        body = self.files.get(self.path)
        fault = self.faults.get(self.path, []).pop(0) if self.faults.get(self.path) else None
        if body is None:
            self.send_error(404)
            return
        if fault == "503":
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if fault == "cut":  # half the body, then the connection drops
            self.wfile.write(body[start : start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture()
def http_mirror():
    books = {"1342": ("pg1342_pride_and_prejudice", "Pride and Prejudice"), "105": ("pg105_persuasion", "Persuasion"),
             "121": ("pg121_northanger_abbey", "Northanger Abbey")}
    _Mirror.files = {f"/cache/epub/{i}/pg{i}.txt": _gutenberg_file(t, _book(n, 30_000)).encode()
                     for i, (n, t) in books.items()}
    _Mirror.files["/cache/epub/feeds/pg_catalog.csv"] = CATALOG.encode()
    _Mirror.faults, _Mirror.log = {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Mirror)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetcher_retries_resumes_and_caches(http_mirror, tmp_path):
    path = "/cache/epub/1342/pg1342.txt"
    _Mirror.faults[path] = ["503", "cut"]
    sleeps = []
    f = Fetcher(retries=3, backoff=0.01, rate=1000, sleep=sleeps.append)
    r = f.fetch(http_mirror + path, tmp_path / "a.txt")
    assert r.status == "downloaded" and r.attempts == 3
    assert (tmp_path / "a.txt").read_bytes() == _Mirror.files[path]
    assert [x[1] for x in _Mirror.log] == [None, None, f"bytes={len(_Mirror.files[path]) // 2}-"]  # Range resume
    assert sleeps[:2] == [0.01, 0.02]  # exponential backoff
    n = len(_Mirror.log)
    assert f.fetch(http_mirror + path, tmp_path / "a.txt").status == "cached" and len(_Mirror.log) == n
    # a .part left by an earlier, interrupted run is continued
    body = _Mirror.files["/cache/epub/105/pg105.txt"]
    (tmp_path / "b.txt.part").write_bytes(body[:1000])
    r = f.fetch(http_mirror + "/cache/epub/105/pg105.txt", tmp_path / "b.txt")
    assert r.status == "resumed" and r.bytes == len(body) - 1000 and (tmp_path / "b.txt").read_bytes() == body
    assert f.fetch(http_mirror + "/cache/epub/4/pg4.txt", tmp_path / "c.txt").status == "missing"
    _Mirror.faults[path] = ["503"] * 5
    with pytest.raises(DataError, match="failed after 2 attempts \\(HTTP 503\\)"):
        Fetcher(retries=1, backoff=0, rate=1000).fetch(http_mirror + path, tmp_path / "d.txt")


def test_fetcher_rate_limit():
    clock = [0.0]
    sleeps = []

    def sleep(s):
        sleeps.append(round(s, 3))
        clock[0] += s

    f = Fetcher(rate=2.0, sleep=sleep, clock=lambda: clock[0])
    for _ in range(3):
        f._wait_turn()
        clock[0] += 0.1  # each request takes 0.1 s
    assert sleeps == [0.4, 0.4]  # requests start 0.5 s apart


def test_prepare_download_and_catalog_filter(capsys, http_mirror, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "ds"
    common = ["--mirror-url", http_mirror, "--cache", cache, "--rate-limit", "1000", "--workers", "0"]
    code, _, err = run_cli(capsys, "prepare", "gutenberg", "--download", "1342,105,4", "--val-ids", "105",
                           "--out", out, *common)
    assert code == 0, err
    docs = {d["id"]: d["title"] for d in open_token_dataset(out).iter_documents()}
    assert docs == {"1342": "Pride and Prejudice", "105": "Persuasion"}  # titles from the headers
    rep = json.loads((out / "prepare-report.json").read_text())
    assert rep["removed"]["not on the mirror (HTTP 404)"]["count"] == 1
    assert (cache / "cache/epub/1342/pg1342.txt").is_file()
    n = len(_Mirror.log)
    # --catalog-filter: the catalog comes from the mirror; cached books are not fetched again
    code, _, err = run_cli(capsys, "prepare", "gutenberg", "--source", "download", "--catalog-filter",
                           "--language", "en", "--ids", "100-1400", "--val-books", "1", "--out", tmp_path / "ds2",
                           *common)
    assert code == 0, err
    fetched = [p for p, _ in _Mirror.log[n:]]
    assert "/cache/epub/feeds/pg_catalog.csv" in fetched and "/cache/epub/1342/pg1342.txt" not in fetched
    assert "/cache/epub/121/pg121.txt" in fetched and "/cache/epub/999/pg999.txt" not in fetched  # fr: filtered
    docs2 = {d["id"]: d["title"] for d in open_token_dataset(tmp_path / "ds2").iter_documents()}
    assert docs2["121"] == "Northanger Abbey" and "1343" not in docs2  # 1343 is not on the mirror


# ---------------------------------------------------------------------------------------------- bad inputs


def _rp_dir(tmp_path, files: dict) -> Path:
    d = tmp_path / "rp"
    for rel, data in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return d


GOOD = b"".join(json.dumps({"text": f"Document {i}. " + "Some words here. " * 40, "meta": {}}).encode() + b"\n"
                for i in range(30))


def test_bad_records_are_counted_skips(capsys, tmp_path):
    bad_lines = (GOOD.split(b"\n")[0] + b"\n" + b'{"text": "unterminated\n' + b'{"meta": {}}\n'
                 + b'{"text": "caf\xe9 latin-1 byte"}\n' + b'{"text": "   "}\n' + b"[1, 2]\n")
    d = _rp_dir(tmp_path, {"book/empty.jsonl": b"", "book/good.jsonl": GOOD, "c4/bad.jsonl": bad_lines + GOOD})
    out = tmp_path / "ds"
    code, stdout, err = run_cli(capsys, "prepare", "redpajama", "--input", d, "--out", out, "--val-fraction", "0.2",
                                "--workers", "0")
    assert code == 0, err
    rep = json.loads((out / "prepare-report.json").read_text())["removed"]
    assert rep["empty file"] == {"count": 1, "chars": 0, "examples": ["book/empty.jsonl"]}
    assert rep["malformed json line"]["count"] == 2
    assert rep["malformed json line"]["examples"][0].startswith("c4/bad.jsonl:2:")
    assert rep["invalid utf-8"]["count"] == 1 and rep["invalid utf-8"]["examples"][0].startswith("c4/bad.jsonl:4:")
    assert rep["record without text"]["count"] == 1 and rep["empty document"]["count"] == 1
    assert "removed 2 x malformed json line (e.g. c4/bad.jsonl:2:" in stdout


@pytest.mark.parametrize("name,data,needle", [
    ("arxiv/blob.jsonl", b"\x00\x01\x02\x03binary" * 100, "binary file, not JSON lines"),
    ("arxiv/cut.jsonl.gz", gzip.compress(GOOD)[:-40], "truncated .gz file"),
    ("arxiv/notgz.jsonl.gz", b"plain text, not gzip\n", "corrupt .gz file"),
    ("arxiv/cut.jsonl.zst", None, "truncated .zst file"),
])
def test_bad_files_are_one_line_errors_naming_the_file(capsys, tmp_path, name, data, needle):
    if data is None:
        import zstandard as zstd
        data = zstd.ZstdCompressor().compress(GOOD * 20)[:-100]
    d = _rp_dir(tmp_path, {"book/good.jsonl": GOOD, name: data})
    code, _, err = run_cli(capsys, "prepare", "redpajama", "--input", d, "--out", tmp_path / "ds", "--workers", "0")
    assert_one_line_error(code, err, needle, str(d / name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rp"]  # nothing left behind


def test_shard_checksum_mismatch_is_one_line_error(capsys, tmp_path):
    d = _rp_dir(tmp_path, {"book/good.jsonl": GOOD})
    out = tmp_path / "ds"
    assert run_cli(capsys, "prepare", "redpajama", "--input", d, "--out", out, "--val-fraction", "0.2",
                   "--workers", "0")[0] == 0
    shard = out / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "data", "inspect", out, "--verify")
    assert_one_line_error(code, err, "checksum mismatch in shard", str(shard))
    (out / "documents.jsonl").write_text("")
    shard.write_bytes(bytes(data[:10]) + bytes([data[10] ^ 0xFF]) + bytes(data[11:]))
    code, _, err = run_cli(capsys, "data", "inspect", out, "--verify")
    assert_one_line_error(code, err, "checksum mismatch in", str(out / "documents.jsonl"))


# ---------------------------------------------------------------------------------------------- validation books


def _mirror_with_cut_zips(root: Path, broken: int) -> list[str]:
    """Three books in a mirror tree, the first `broken` of them (in --val-books order) as truncated zips; returns
    the ids in that order."""
    import hashlib

    books = {"105": ("pg105_persuasion", "Persuasion"), "121": ("pg121_northanger_abbey", "Northanger Abbey"),
             "1342": ("pg1342_pride_and_prejudice", "Pride and Prejudice")}
    order = sorted(books, key=lambda v: hashlib.sha256(v.encode()).hexdigest())  # --val-books takes them so
    for i, (name, title) in books.items():
        (root / i).mkdir(parents=True)
        body = _gutenberg_file(title, _book(name, 15_000))
        if i in order[:broken]:
            z = io.BytesIO()
            with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(f"{i}.txt", body)
            (root / i / f"{i}-0.zip").write_bytes(z.getvalue()[: len(z.getvalue()) // 2])  # cut short
        else:
            (root / i / f"{i}-0.txt").write_text(body)
    return order


def test_val_books_pass_over_an_unreadable_book(capsys, tmp_path):
    """A picked validation book that cannot be read (a truncated zip) is passed over for the next one before the
    long pass, and the run (and a rerun) succeeds; naming it with --val-ids is an error before any work."""
    root = tmp_path / "mirror"
    order = _mirror_with_cut_zips(root, 1)
    out = tmp_path / "ds"
    args = ["prepare", "gutenberg", "--source", "mirror", "--mirror", root, "--workers", "0", "--dedup", "none"]
    for _ in range(2):  # a rerun gives the same
        code, stdout, err = run_cli(capsys, *args, "--val-books", "1", "--out", out)
        assert code == 0, err
        docs = {d["id"]: d["split"] for d in open_token_dataset(out).iter_documents()}
        assert docs == {order[1]: "val", order[2]: "train"}
        assert f"validation: book {order[0]} passed over" in stdout and "corrupt zip" in stdout
    rep = json.loads((out / "prepare-report.json").read_text())
    assert rep["removed"]["unreadable file"]["count"] == 1 and any("passed over" in n for n in rep["notes"])
    assert rep["read"]["documents"] == 2  # the unreadable file is not a document read
    code, _, err = run_cli(capsys, *args, "--val-ids", order[0], "--out", tmp_path / "ds2")
    assert_one_line_error(code, err, f"--val-ids {order[0]}", "corrupt zip", f"{order[0]}-0.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "mirror"]  # nothing begun
    root2 = tmp_path / "mirror2"
    order = _mirror_with_cut_zips(root2, 2)
    code, _, err = run_cli(capsys, *args[:5], root2, *args[6:], "--val-books", "2", "--out", tmp_path / "ds3")
    assert_one_line_error(code, err, "only 1 of the 2 validation book(s) can be read",
                          f"unreadable: {order[0]}, {order[1]}")
    assert not (tmp_path / "ds3").exists()


def test_val_book_removed_as_a_duplicate(capsys, mirror, tmp_path):
    code, _, err = run_cli(capsys, "prepare", "gutenberg", "--source", "mirror", "--mirror", mirror, "--catalog",
                           mirror / "pg_catalog.csv", "--language", "en", "--val-ids", "1343", "--out", tmp_path / "d",
                           "--workers", "0")
    assert_one_line_error(code, err, "the val split came out empty: the validation book(s) 1343 were removed",
                          "1 x exact duplicate", "--val-ids")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_parquet_text_column_that_is_not_text(capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"id": ["1", "2"], "text": [5, 6]}), tmp_path / "pq" / "ints.parquet")
    code, _, err = run_cli(capsys, "prepare", "gutenberg", "--source", "parquet", "--parquet", tmp_path / "pq",
                           "--out", tmp_path / "x")
    assert_one_line_error(code, err, str(tmp_path / "pq" / "ints.parquet"), "column 'text' holds int64, not text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pq"]
