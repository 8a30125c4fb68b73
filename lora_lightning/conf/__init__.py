"""Hydra configs of the ``lora-lightning`` app (a package so the wheel ships them)."""
