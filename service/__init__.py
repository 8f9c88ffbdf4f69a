"""prunegraph service: ingestion, jobs, storage, executor, dashboard."""
