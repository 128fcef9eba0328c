"""SQLite snapshots of the shards' aggregates."""
