"""Which reward a row needs: the ability named in extra_info, else one judged from the data source.

Owns only that rule (light to import: data loaders use it without loading the verifiers).
"""
from __future__ import annotations

from typing import Any

CODE_SOURCE_MARKERS = ("code", "leetcode", "livecodebench", "taco")


def ability_of(data_source: str, extra_info: dict[str, Any] | None = None) -> str:
    """extra_info["ability"] when given, else "code" for code-like data sources, else "math"."""
    if extra_info and extra_info.get("ability"):
        return str(extra_info["ability"])
    name = (data_source or "").lower()
    return "code" if any(marker in name for marker in CODE_SOURCE_MARKERS) else "math"
