"""Cardiac MR: read any vendor's study, classify its series, render the analysis images.

``load_study`` (headers → per-frame records) → ``classify_study`` (view per series,
geometry first) → ``prepare_images`` (ED/ES, basal/mid/apical, VOI LUT, PNG).
"""
from __future__ import annotations

import os
from typing import Sequence

from worker.bundle import BundleImage

from .classify import Classification, classify_study
from .prepare import PrepareError, prepare_images
from .series import Frame, SeriesInfo, Study, load_study
from .views import View

__all__ = [
    "Classification",
    "Frame",
    "PrepareError",
    "SeriesInfo",
    "Study",
    "View",
    "analyse_paths",
    "classify_study",
    "load_study",
    "prepare_images",
]


def analyse_paths(paths: Sequence[str | os.PathLike]) -> tuple[Study, dict[str, Classification], list[BundleImage],
                                                               list[str]]:
    """Load, classify and render one study's files.

    Returns
    -------
    tuple
        (study, SeriesInstanceUID → Classification, images, limitations).

    Raises
    ------
    PrepareError
        When the study holds no cine that can be analysed.
    """
    study = load_study(paths)
    classifications = classify_study(study)
    images, limitations = prepare_images(study, classifications)
    return study, classifications, images, limitations
