"""prunegraph service, in rooms (each imports only the rooms below it; import-linter checks):

- :mod:`service.main`: ``create_app``, the composition root;
- :mod:`service.dashboard`: the HTML pages;
- :mod:`service.api`: routes, the request context, response models, the one error-to-HTTP map;
- :mod:`service.jobs`: the one loader of a job's inputs, the tasks, the worker, the executors;
- :mod:`service.ingest` (reading checkpoints and activations; no server extra needed) and
  :mod:`service.store` (database, files, cache);
- :mod:`service.errors` (domain errors) and :mod:`service.settings`.
"""
