"""`phiforge prepare CORPUS` as an API: one config dataclass per corpus, read by the training config loader, and
`prepare_corpus(cfg)`, which builds the source, picks the validation documents and runs `prepare`.

    from phiforge.data.corpora import load_prepare_config, prepare_corpus

    cfg = load_prepare_config("gutenberg", "prep.yaml", flags={"val_books": "2"}, sets=["workers=4"])
    index = prepare_corpus(cfg)                       # prints the report; echo=None for silence

Every flag of `phiforge prepare gutenberg|redpajama` is the config key of the same name (`--val-books 2` is
`val_books: 2`). Precedence: the defaults, then the YAML file, then the flags, then `--set`. `parse_flags`
reads flags from a list of arguments (a study's `data.prepare_args`, `litgpt prepare --prepare-args`).
Values are checked when the config is made, so `--print-config` prints only configs that load.

The Gutenberg sources by `--source` name are in `GUTENBERG_SOURCES` (the one registry), the corpora in
`CORPORA`.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import yaml

from phiforge.config import apply_overrides, from_dict, read_yaml, yaml_value
from phiforge.data.mirror import (DEFAULT_MIRROR, DEFAULT_TEMPLATE, CatalogFilter, DownloadGutenberg,
                                  MirrorGutenberg, ParquetGutenberg, parse_id_ranges)
from phiforge.data.redpajama import DEFAULT_WEIGHTS, RedPajamaSource, parse_weights
from phiforge.data.shards import DEFAULT_SHARD_TOKENS
from phiforge.data.sources import BundledGutenberg, Source, choose_val_ids
from phiforge.data.tasks import Task, check_parts_dir, resolve_task
from phiforge.errors import ConfigError, DataError

GUTENBERG_SOURCES: dict[str, type[Source]] = {"bundled": BundledGutenberg, "mirror": MirrorGutenberg,
                                              "parquet": ParquetGutenberg, "download": DownloadGutenberg}


def _names(value) -> list[str] | None:
    """"a,b" or [a, b] -> ["a", "b"] (None stays None)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    return [str(v).strip() for v in items if str(v).strip()]


@dataclass
class PrepareConfig:
    """The keys every corpus takes. Subclasses add the source's keys; `corpus` names the subcommand."""

    out: str | None = None  # the dataset directory (an existing dataset there is replaced at the end)
    tokenizer_dir: str | None = None  # a directory with tokenizer.json (default: the built-in GPT-2 BPE)
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    workers: int | None = None  # processes that clean and tokenize (None: all cores; 0: in this process)
    dedup: str | None = None  # exact, near, exact,near or none (None: the corpus's default)
    near_dup_threshold: float = 0.8
    checkpoint_seconds: float = 60.0
    restart: bool = False  # discard an interrupted run of this out instead of resuming it
    progress: bool | None = None  # the progress bar: None only on a terminal
    task_count: int | None = None  # split the input into this many tasks; this run prepares one (a part)
    task_index: int | None = None  # which task (None: from the scheduler's array variables)

    corpus: ClassVar[str] = ""
    exclusive: ClassVar[dict[str, str]] = {}  # a flag that clears another key of the file (val_ids: val_books)

    def __post_init__(self):
        self._normalise()
        self._check()
        if self.task_count is not None:  # the index may come from the scheduler's variables when the task runs
            Task(0 if self.task_index is None else self.task_index, self.task_count)
        elif self.task_index is not None:
            raise DataError("--task-index goes with --task-count N (the number of tasks the input is split into)")
        from phiforge.data.prepare import PrepareOptions

        PrepareOptions(**self.options(**self._val_placeholder()))  # the pipeline's own checks

    def _normalise(self) -> None:
        pass

    def _check(self) -> None:
        pass

    def _val_placeholder(self) -> dict:
        return {"val_ids": []}

    def options(self, **extra) -> dict:
        """The keyword arguments of `prepare` (PrepareOptions) this config sets, plus `extra`."""
        return {"tokenizer_dir": self.tokenizer_dir, "shard_tokens": self.shard_tokens, "workers": self.workers,
                "dedup": self.dedup, "near_dup_threshold": self.near_dup_threshold,
                "checkpoint_seconds": self.checkpoint_seconds, "restart": self.restart, "progress": self.progress,
                **extra}


@dataclass
class GutenbergPrepareConfig(PrepareConfig):
    """`phiforge prepare gutenberg`: books from the bundled sample, a mirror tree, parquet dumps or downloads."""

    source: str | None = None  # bundled | mirror | parquet | download (default bundled; download with download)
    val_books: int | None = None  # hold out N whole books (default: the source's choice)
    val_ids: list[str] | str | None = None  # hold out these ebook numbers
    mirror: str | None = None  # source mirror: the rsync tree
    catalog: str | None = None  # pg_catalog.csv
    language: list[str] | str | None = None  # catalog languages to keep, e.g. [en]
    type: list[str] | str | None = None  # catalog types to keep (default [Text])
    ids: str | None = None  # book ids, e.g. 1-1000,2701 (mirror: a filter; download: what to fetch)
    parquet: list[str] | str | None = None  # source parquet: files or folders of .parquet
    download: str | None = None  # shorthand for source: download, ids: IDS
    catalog_filter: bool = False  # source download: fetch the catalog's books that pass language/type/ids
    mirror_url: str = DEFAULT_MIRROR
    url_template: str = DEFAULT_TEMPLATE
    cache: str | None = None  # download cache (default ~/.cache/phiforge/gutenberg)
    rate_limit: float = 0.5  # requests per second
    retries: int = 5

    corpus: ClassVar[str] = "gutenberg"
    exclusive: ClassVar[dict[str, str]] = {"val_books": "val_ids", "val_ids": "val_books"}

    def _normalise(self) -> None:
        self.val_ids, self.language, self.type = _names(self.val_ids), _names(self.language), _names(self.type)
        if isinstance(self.parquet, str):
            self.parquet = [self.parquet]
        if self.download:  # --download IDS = --source download --ids IDS
            if self.source not in (None, "download"):
                raise DataError(f"--download goes with --source download, not --source {self.source}")
            if self.ids:
                raise DataError("give --download IDS or --ids IDS, not both")
            self.source, self.ids, self.download = "download", self.download, None
        if self.source is None:
            self.source = "download" if self.catalog_filter else "bundled"

    def _check(self) -> None:
        if self.source not in GUTENBERG_SOURCES:
            raise DataError(f"unknown --source '{self.source}' (choose from: {', '.join(GUTENBERG_SOURCES)})")
        if self.val_books is not None and self.val_ids is not None:
            raise DataError("give --val-books or --val-ids, not both")
        if self.val_books is not None and self.val_books < 1:
            raise DataError(f"--val-books (val_books) must be at least 1, got {self.val_books}")
        if self.source == "bundled":
            for key in ("mirror", "catalog", "language", "ids", "parquet"):
                if getattr(self, key):
                    raise DataError(f"--{key} does not apply to --source bundled")
        if self.source == "mirror" and (self.language or self.type) and not self.catalog:
            raise DataError("--language/--type filter by the catalog: give --catalog pg_catalog.csv")
        parse_id_ranges(self.ids)
        if not self.rate_limit > 0:
            raise DataError(f"--rate-limit (rate_limit) must be above 0 requests per second, got {self.rate_limit}")
        if self.retries < 0:
            raise DataError(f"--retries (retries) must be 0 or more, got {self.retries}")


@dataclass
class RedPajamaPrepareConfig(PrepareConfig):
    """`phiforge prepare redpajama`: RedPajama-Data-1T / 1T-Sample / V2 JSON lines, tokenized per source."""

    input: str | None = None  # the download: per-source folders, 1T-Sample files or V2 documents/
    sources: list[str] | str | None = None  # only these sources, e.g. [book, github]
    weights: dict[str, float] | str | None = None  # mixture weights for the loader (default: lit-gpt's)
    val_fraction: float = 0.001  # documents held out by a hash of their id (at least one: see docs/data.md)
    quality_filter: str | None = None  # rpv2-basic or module:function

    corpus: ClassVar[str] = "redpajama"

    def _normalise(self) -> None:
        self.sources = _names(self.sources)
        if isinstance(self.weights, str):
            self.weights = parse_weights(self.weights)

    def _val_placeholder(self) -> dict:
        return {"val_fraction": self.val_fraction, "mixture": self.weights}


# the keys of `prepare gutenberg` that choose the books (and the validation books), not how they are prepared
SELECTION_KEYS = tuple(f.name for f in dataclasses.fields(GutenbergPrepareConfig)
                       if f.name not in {g.name for g in dataclasses.fields(PrepareConfig)})

CORPORA: dict[str, type[PrepareConfig]] = {"gutenberg": GutenbergPrepareConfig, "redpajama": RedPajamaPrepareConfig}


def config_class(corpus: str) -> type[PrepareConfig]:
    if corpus not in CORPORA:
        raise DataError(f"`phiforge prepare {corpus}` does not exist (corpora: {', '.join(CORPORA)}); prepare "
                        "the corpus into a phiforge dataset some other way and use that directory")
    return CORPORA[corpus]


# ---------------------------------------------------------------------------------------------- loading


def _takes_text(tp) -> bool:
    return tp is str or str in typing.get_args(tp)


def _keys(cls: type[PrepareConfig]) -> dict[str, object]:
    """Config key -> its type."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _flag_value(tp, raw):
    """A flag's text as a config value: kept as text for keys that take text, else read as YAML (numbers,
    true/false), so the typed loader checks it as it checks a file."""
    if not isinstance(raw, str) or _takes_text(tp):
        return raw
    return yaml_value(raw, "a flag's value")


def parse_flags(corpus: str, argv: list[str]) -> dict:
    """Flags of `phiforge prepare CORPUS` (["--val-books", "2", "--restart", "--parquet", "a", "b"]) as config
    values; an option it does not take is a ConfigError naming it."""
    keys = _keys(config_class(corpus))
    out, i = {}, 0
    while i < len(argv):
        arg = str(argv[i])
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        key = name.replace("-", "_")
        if key not in keys:
            raise ConfigError(f"`phiforge prepare {corpus}` has no option {arg!r} (it takes: "
                              f"{', '.join('--' + k.replace('_', '-') for k in keys)})")
        tp, i = keys[key], i + 1
        if (tp is bool or bool in typing.get_args(tp)) and not eq:  # a switch
            out[key] = True
            continue
        if not eq:
            values = []
            while i < len(argv) and not str(argv[i]).startswith("--"):
                values.append(str(argv[i]))
                i += 1
            if not values:
                raise ConfigError(f"`phiforge prepare {corpus}`: option {arg} needs a value")
            many = any(typing.get_origin(a) is list for a in typing.get_args(tp))
            if len(values) > 1 and not many:
                raise ConfigError(f"`phiforge prepare {corpus}`: option {arg} takes one value, got {values}")
            value = values if len(values) > 1 else values[0]
        out[key] = _flag_value(tp, value)
    return out


def load_prepare_config(corpus: str, path: str | Path | None = None, flags: dict | None = None,
                        sets: list[str] | None = None) -> PrepareConfig:
    """The config of `phiforge prepare CORPUS`: defaults, then the YAML file, then flags ({key: value or its
    text}), then `key=value` overrides."""
    cls = config_class(corpus)
    data = read_yaml(path) if path else {}
    for key, value in flag_values(cls, flags or {}).items():
        data.pop(cls.exclusive.get(key), None)  # --val-ids on the command line replaces the file's val_books
        data[key] = value
    apply_overrides(data, sets or [])
    return from_dict(cls, data)


def flag_values(cls: type, flags: dict, keys=None, prefix: str = "") -> dict:
    """Flags ({key: value or its text}) as config values of dataclass cls; a key not in `keys` (default: all of
    cls's) is a ConfigError (naming it with `prefix`)."""
    types = _keys(cls)
    keys = types if keys is None else keys
    for key in flags:
        if key not in keys:
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys here: {', '.join(sorted(keys))}")
    return {key: _flag_value(types[key], value) for key, value in flags.items()}


def gutenberg_selection(keys: dict) -> GutenbergPrepareConfig:
    """The GutenbergPrepareConfig of the keys that choose books (SELECTION_KEYS: `tokenizer train`'s gutenberg)."""
    values = flag_values(GutenbergPrepareConfig, keys, SELECTION_KEYS, prefix="gutenberg.")
    return from_dict(GutenbergPrepareConfig, values, prefix="gutenberg.")


def config_yaml(cfg: PrepareConfig) -> str:
    """The config as YAML, itself a valid config file."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------- running


def _gutenberg_source(cfg: GutenbergPrepareConfig) -> Source:
    types = tuple(cfg.type) if cfg.type else ("Text",)
    langs = tuple(cfg.language) if cfg.language else None
    if cfg.source == "bundled":
        return BundledGutenberg()
    if cfg.source == "mirror":
        flt = CatalogFilter(langs, types if cfg.catalog else None, parse_id_ranges(cfg.ids))
        return MirrorGutenberg(mirror=cfg.mirror, catalog=cfg.catalog, filter=flt)
    if cfg.source == "parquet":
        return ParquetGutenberg(parquet=cfg.parquet)
    from phiforge.data.download import Fetcher

    src = DownloadGutenberg(ids=cfg.ids, catalog_filter=cfg.catalog_filter, catalog=cfg.catalog,
                            filter=CatalogFilter(langs, types, None), mirror_url=cfg.mirror_url,
                            url_template=cfg.url_template, cache=cfg.cache,
                            fetcher=Fetcher(retries=cfg.retries, rate=cfg.rate_limit), progress=cfg.progress)
    src.fetch()
    return src


def build_source(cfg: PrepareConfig) -> tuple[Source, dict]:
    """The source a config names and the validation options of `prepare` (validation books checked first)."""
    if isinstance(cfg, GutenbergPrepareConfig):
        source = _gutenberg_source(cfg)
        chosen, method = choose_val_ids(source, val_books=cfg.val_books, val_ids=cfg.val_ids, check=True)
        return source, {"val_ids": chosen, "val_method": method}
    if isinstance(cfg, RedPajamaPrepareConfig):
        if not cfg.input:
            raise DataError("give --input DIR (input: in a --config file): the RedPajama download")
        source = RedPajamaSource(cfg.input, sources=cfg.sources, quality_filter=cfg.quality_filter)
        weights = dict(DEFAULT_WEIGHTS) if cfg.weights is None else dict(cfg.weights)
        return source, {"val_fraction": cfg.val_fraction, "mixture": weights}
    raise ConfigError(f"not a prepare config: {type(cfg).__name__}")


def prepare_corpus(cfg: PrepareConfig, echo=print) -> dict:
    """Prepare the dataset a config describes into cfg.out; returns its index. echo(line) gets the report and
    the dataset summary (None: print nothing)."""
    from phiforge.data.output import check_out_dir, dataset_lock
    from phiforge.data.prepare import prepare

    if not cfg.out:
        raise DataError("give --out DIR (out: in a --config file): where the dataset goes")
    out, task = Path(cfg.out), resolve_task(cfg.task_index, cfg.task_count)
    if task is not None:  # OUT holds the parts; this task writes its own
        check_parts_dir(out)
        out = out / task.name
    check_out_dir(out)  # before any book is read
    t0 = time.perf_counter()
    with dataset_lock(out):  # before a download starts: a second prepare of this --out is refused at once
        source, val = build_source(cfg)
        index = prepare(source, out, summary=echo, task=task, **cfg.options(**val))
    if echo is not None:
        for line in dataset_summary(index, out, time.perf_counter() - t0):
            echo(line)
    return index


def dataset_summary(index: dict, out, seconds: float, max_docs: int = 40) -> list[str]:
    """What was written: a table of the documents (when there are at most max_docs), then one line per split."""
    import json

    docs, lines = [], []
    if index["documents"]["count"] <= max_docs:
        with open(Path(out) / index["documents"]["file"], encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
    if docs:
        w = min(50, max([len(d.get("title", "")) for d in docs] + [5]))
        lines.append(f"{'id':>6}  {'title':<{w}}  {'split':<5}  {'tokens':>10}  {'header':>7}  {'footer':>7}")
        for d in docs:
            lines.append(f"{d['id']:>6}  {d.get('title', '')[:w]:<{w}}  {d['split']:<5}  {d['tokens']:>10,}  "
                         f"{d.get('removed_header_chars', 0):>7,}  {d.get('removed_footer_chars', 0):>7,}")
    total = sum(info["tokens"] for info in index["splits"].values())
    unit = "book(s)" if index.get("prepared", {}).get("corpus") == "gutenberg" else "document(s)"
    for split, info in index["splits"].items():
        srcs = info.get("sources", {})
        by = (" [" + ", ".join(f"{k} {v['tokens']:,}" for k, v in srcs.items()) + "]") if len(srcs) > 1 else ""
        lines.append(f"{split}: {info['documents']} {unit}, {info['tokens']:,} tokens in {len(info['shards'])} "
                     f"shard(s){by}")
    lines.append(f"wrote {out} ({index['dtype']}, {total:,} tokens) in {seconds:.1f} s"
                 + ("; header/footer = characters of Gutenberg boilerplate removed" if docs else ""))
    return lines
