"""Storage: the shard schema, the asynchronous writer and the reader. Knows no torch."""
