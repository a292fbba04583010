"""Data layer: Gutenberg cleaning, document sources, packed token shards, training/eval loaders.

    gutenberg.py  raw text -> book (BOM, line ends, header/licence/footer, NFC)
    sources.py    where documents come from (`--source bundled`, ...)
    prepare.py    documents -> tokens -> shards + index.json (`phiforge prepare`)
    shards.py     the on-disk format: writer, reader (`open_token_dataset`)
    loader.py     `PackedLoader` (training) and `eval_batches` (validation)

Modules are imported on use: `phiforge.data.loader` pulls in torch, the rest only numpy.
"""
