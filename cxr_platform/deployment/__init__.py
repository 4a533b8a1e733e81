"""Export, the model registry and the promotion gate."""
