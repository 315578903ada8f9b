"""From source documents to MDS shards: readers for ``.jsonl.zst``, WebDataset tar and QuRatedPajama parquet
(``sources``), the local BPE tokenizer (``tokenizer``) and the tokenize → pack → write pipeline (``pipeline``)."""
