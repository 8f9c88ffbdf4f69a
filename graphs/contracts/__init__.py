"""The wire contracts between the service and its clients, defined once (issue 16).

Both sides import these (``graphs`` is the pure layer either may use); neither redefines them:

- :mod:`graphs.contracts.jobs`: the job request (``POST /v1/jobs``: :class:`JobRequest`, its
  planning options :class:`CompensationOptions`) and the job status (``GET /v1/jobs/{id}``:
  :class:`JobStatus`);
- :mod:`graphs.contracts.activations`: the activations file (``clients.capture_activations``
  writes it, the service reads it): format and version, tensor and metadata names, and a
  header reader that checks them;
- :mod:`graphs.contracts.safetensors`: decoding the JSON header of any safetensors file
  (checkpoints and activations files), hardened against hostile bytes.

The modules import pydantic, numpy and graphs' light models only: no igraph, leidenalg,
hypernetx or scipy.
"""
