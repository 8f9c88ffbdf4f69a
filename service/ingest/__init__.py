"""Reading checkpoints and activations files: format detection, the ``.pt``/safetensors/ONNX
readers, layers from tensors, manifests from ONNX graphs. Pure of the web and the database:
importable with the base install (the CLI's embedded mode), raises only domain errors."""
