"""Checkpoints: atomic save with a manifest, reading without running code, and the models a run folder holds."""
