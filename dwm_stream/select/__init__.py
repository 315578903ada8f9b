"""Preselection over a converted corpus: DSIR (``dsir``), QuRating (``qurating``), the token budget (``budget``) and
writing the selected samples as a corpus of their own (``materialize``). A selection is a file that
``DWMDataset`` overlays on the unchanged shards."""
