"""Drift monitoring, the retained labeled inputs, fine-tuning and shadow evaluation."""
