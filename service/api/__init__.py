"""The HTTP API's room: routes, the request context (auth, sessions), response models, and the
one mapping from domain errors to HTTP status and JSON bodies (:mod:`service.api.errors`)."""
