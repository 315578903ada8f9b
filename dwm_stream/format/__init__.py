"""The shard contract and everything that reads it back: MDS columns and sidecars (``shards``), zero-copy record
views (``view``), integrity checks on the read path (``integrity``), object storage (``storage``) and a shard-by-shard
corpus reader for offline passes (``reader``)."""
