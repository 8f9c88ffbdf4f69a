"""Where per-group analysis tasks run: :mod:`.local` (this process or a pool) or :mod:`.dask`."""
