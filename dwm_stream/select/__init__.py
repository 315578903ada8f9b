"""Preselection over a converted corpus: DSIR (``dsir``), QuRating (``qurating``), the token budget (``budget``),
writing the selected samples as a corpus of their own (``materialize``), and the steps both selectors share:
check → select to the budget → write the selection → materialise (``pipeline``). A selection is a file that
``DWMDataset`` overlays on the unchanged shards."""
