from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture()
def orthanc(tmp_path):
    """A real Orthanc (PACS) with DICOMweb on free ports; fails (never skips) when not installed."""
    from peers import Orthanc

    o = Orthanc(tmp_path / "orthanc")
    try:
        yield o
    finally:
        o.stop()
        if os.environ.get("CMR_AI_SHOW_ORTHANC_LOG"):
            print(o.log_path.read_text()[-4000:])


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """The tiny demo LLaVA, built once per test session (no download)."""
    from worker.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "demo")
