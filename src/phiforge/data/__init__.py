"""Data layer: corpora -> cleaned, deduplicated, tokenized, packed shards -> training/eval batches (docs/data.md).

    sources.py    where documents come from: Source / Unit / RawDoc, `--source bundled`, validation choice
    mirror.py     Gutenberg mirror tree + pg_catalog.csv, parquet dumps, downloads (`--source mirror|parquet|download`)
    download.py   resumable, rate-limited HTTP fetches into a cache
    redpajama.py  RedPajama 1T / 1T-Sample / V2 (`phiforge prepare redpajama`), quality-filter hook
    gutenberg.py  raw text -> book (BOM, line ends, encoding fallback, header/licence/footer, NFC)
    dedup.py      exact and near-duplicate (MinHash/LSH) removal
    readers.py    plain/.gz/.zst JSON lines, streamed, with one-line errors for broken files
    report.py     what a prepare run read, kept and removed (prepare-report.json)
    prepare.py    the parallel, resumable pipeline: `prepare(source, out, val_ids, **PrepareOptions)`
    corpora.py    `phiforge prepare CORPUS` as an API: PrepareConfig per corpus, `prepare_corpus(cfg)`, the
                  Gutenberg source registry
    shards.py     the on-disk format: writer, reader (`open_token_dataset`), versions 1 and 2
    loader.py     `PackedLoader` (training, source mixture) and `eval_batches` (validation)

Modules are imported on use: `phiforge.data.loader` pulls in torch, the rest only numpy (+ pyarrow/zstandard
when those inputs are read).
"""
