"""Data: the `Batch` contract, pre-tokenized WebDataset shards, packing and the loader."""
