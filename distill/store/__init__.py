"""Where shards live: create-only local/GCS storage (:mod:`~distill.store.storage`) and the
bounded, checksum-verified local cache the student streams them through
(:mod:`~distill.store.cache`). No torch."""
