"""Closed vocabulary of cardiac MR series views."""
from __future__ import annotations

from enum import Enum


class View(str, Enum):
    """What a series shows. Values are the strings used in templates, bundles and logs."""

    SAX = "SAX"  # short-axis cine stack
    CH2 = "2CH"  # long-axis cine, 2-chamber
    CH3 = "3CH"  # long-axis cine, 3-chamber (LV outflow tract)
    CH4 = "4CH"  # long-axis cine, 4-chamber
    LGE = "LGE"
    T1MAP = "T1MAP"
    T2MAP = "T2MAP"
    PERFUSION = "PERFUSION"
    LOCALIZER = "LOCALIZER"
    OTHER = "OTHER"

    @classmethod
    def parse(cls, text: str) -> "View":
        """Convert a template/config string to a View, with a clear error."""
        for v in cls:
            if text.upper() == v.value or text.upper() == v.name:
                return v
        raise ValueError(f"unknown view {text!r}; expected one of {', '.join(v.value for v in cls)}")


LONG_AXIS = (View.CH2, View.CH3, View.CH4)
CINE_VIEWS = (View.SAX, View.CH2, View.CH3, View.CH4)
