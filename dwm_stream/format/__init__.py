"""The shard contract and everything that reads it back: MDS columns and sidecars (``shards``), the column layouts the
dataset reads, its own and LLM Foundry's (``foundry``), zero-copy record views (``view``), integrity checks on the read
path (``integrity``), object storage (``storage``) and a shard-by-shard corpus reader for offline passes (``reader``)."""
