"""Nested dict merging, shared by the run config (a file over its ``base:``) and the model's
config overrides (over open_clip's model config)."""
from __future__ import annotations

import copy
from typing import Any


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``overrides`` applied: nested dicts merged key by key, anything else replaced.

    Used for a config file over its ``base:`` file and for model-config overrides over open_clip's model
    config; neither input is changed, and the result shares no mutable part with them.
    """
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
