"""Training and judging a network: the architecture zoo, the recipe, the checkpoint record, the
training loop, evaluation with medical metrics, reporting and robustness. Torch, scipy and
scikit-learn live here; the settings reader does not."""
