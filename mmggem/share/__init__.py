"""Sharing trained models: export to open_clip's folder layout, model cards, the Hub."""
