"""Watching the traffic: drift windows and their reports, fine-tuning on labeled live inputs,
and shadow evaluation. What it watches is stored and transformed on lower floors."""
