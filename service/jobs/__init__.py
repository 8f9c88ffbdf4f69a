"""Running jobs: the one loader of a job's inputs, the analysis tasks, the worker that claims
queued jobs, and the executors (local processes or Dask) that run per-group tasks."""
