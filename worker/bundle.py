"""What crosses the node/GPU boundary: the analysis bundle and the inference result.

Both travel as JSON in Celery messages, so they are pydantic models with plain
fields. The GPU worker needs nothing but the bundle: never a path into the DICOM
store.
"""
from __future__ import annotations

import base64
import io
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class SourceRef(BaseModel):
    """The stored instance (and frame) an analysis image was rendered from."""

    model_config = ConfigDict(frozen=True)

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    frame_number: Optional[int] = None  # 1-based, for multi-frame objects
    rows: int
    columns: int


class BundleImage(BaseModel):
    """One rendered grayscale image (PNG, 8-bit) of one slice at one phase."""

    model_config = ConfigDict(frozen=True)

    key: str  # unique in the bundle, e.g. "SAX_mid_ED"
    view: str  # a plugin.cardiac.views.View value
    phase: str  # "ED", "ES" or "" when not a cine
    label: str  # human-readable, burnt into the SC ("SAX mid ED")
    png_b64: str
    source: SourceRef

    def to_pil(self):
        from PIL import Image

        return Image.open(io.BytesIO(base64.b64decode(self.png_b64))).convert("RGB")

    @staticmethod
    def encode_png(img) -> str:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")


class Question(BaseModel):
    """One template finding as the model sees it."""

    model_config = ConfigDict(frozen=True)

    id: str  # finding id, e.g. "pericardial_effusion"
    text: str  # the question put to the model
    options: list[str]  # option ids, e.g. ["none", "small", "moderate", "large"]
    option_texts: list[str]  # what the model scores, same order as options
    views: list[str]  # View values the finding is judged on


class AnalysisBundle(BaseModel):
    """Everything `infer` needs."""

    job_id: int
    study_instance_uid: str
    model: str  # the model name from the config (`models:` key)
    template: str  # template name
    template_hash: str = ""  # SHA-256 of the template file (set by prepare; "" in old messages)
    questions: list[Question]
    images: list[BundleImage]
    impression: bool = True  # generate a free-text impression
    limitations: list[str] = Field(default_factory=list)
    clinical_context: str = ""  # "Clinical context: 54-year-old male; reason: …" (from the study), or ""

    def images_for(self, views: list[str]) -> list[BundleImage]:
        """The images of the given views, in bundle order; all images when none match."""
        chosen = [im for im in self.images if im.view in views]
        return chosen or list(self.images)


class FindingResult(BaseModel):
    id: str
    answer: str  # option id with the highest probability
    probabilities: dict[str, float]  # option id -> probability (sums to 1)
    image_keys: list[str]  # the bundle images the answer was judged on


class InferenceResult(BaseModel):
    job_id: int
    model: str
    model_fingerprint: str  # the model version: weights + adapter + quantisation + template (engine.model_version)
    device: str
    quantization: str
    findings: list[FindingResult]
    impression: str = ""
    seconds: float = 0.0
    #: What the audit table keeps of this run (prompts, image hashes, option scores,
    #: outputs, timings; see :func:`worker.model.engine.run_bundle`). Built by the GPU
    #: worker, written to the database by the node's ``report`` task.
    audit: dict = Field(default_factory=dict)
    #: Peak GPU memory of this inference, measured on the worker (``/metrics`` shows the
    #: latest per host and device): ``{"host", "device", "peak_bytes", "peak_reserved_bytes",
    #: "total_bytes"}`` (bytes, PyTorch's allocator); None when it ran on the CPU.
    gpu_memory: Optional[dict] = None
