"""Data: where batches for ``fit()`` come from.

Pretraining: ``sources`` (text files, folders, JSONL, parquet -> documents) and ``blocks`` (documents ->
cached token file -> fixed-length blocks, :class:`~nexttok.data.blocks.BlockSource`).
Fine-tuning: ``formats`` (records), ``chat`` (rendering with label masks) and ``batches`` (padded or
packed batches).
"""
