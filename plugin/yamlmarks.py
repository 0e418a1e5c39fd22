"""Line numbers for errors in YAML files loaded with ruamel.yaml's round-trip loader.

Shared by the config loader and the report-template loader so both name
``FILE:LINE: key: message`` the same way.
"""
from __future__ import annotations

from typing import Any


def line_of(doc: Any, loc: tuple) -> int:
    """Best line (1-based) for an error location (keys and indexes) inside a ruamel document."""
    node, line = doc, 1
    for part in loc:
        try:
            if hasattr(node, "lc"):
                if isinstance(part, int) and isinstance(node, list):
                    if part < len(node):
                        line = node.lc.item(part)[0] + 1
                elif isinstance(node, dict) and part in node:
                    line = node.lc.key(part)[0] + 1
                else:
                    line = node.lc.line + 1
            node = node[part]
        except (KeyError, IndexError, TypeError, AttributeError):
            break
    return line


def key_of(loc: tuple) -> str:
    """``rules[0].match.Modality`` for ("rules", 0, "match", "Modality")."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "(top)"
