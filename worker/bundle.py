"""What crosses the node/GPU boundary: the analysis bundle and the inference result.

Both travel as JSON in Celery messages, so they are pydantic models with plain
fields. The GPU worker needs nothing but the bundle: never a path into the DICOM
store.
"""
from __future__ import annotations

import base64
import io
from typing import Optional, Sequence

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
    #: The LV region of this image, ``(left, top, right, bottom)`` in its pixels: a square
    #: around the LV blood pool found on the end-diastolic image of the same slice (so the
    #: ED and ES images share it). Set for short-axis images by ``prepare`` when a blood
    #: pool is found; a question with ``zoom: lv`` shows the model this region only.
    roi: Optional[tuple[int, int, int, int]] = None

    @property
    def level(self) -> str:
        """The SAX slice level of the image (``basal``, ``mid``, ``apical``), from its key; "" otherwise."""
        parts = self.key.split("_")
        return parts[1] if len(parts) == 3 and parts[0] == "SAX" else ""

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
    slices: list[str] = Field(default_factory=list)  # SAX levels to use ("basal", "mid", "apical"); [] = all
    zoom: str = ""  # "lv": crop each image to its BundleImage.roi before tiling; "" = whole images


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

    def images_for(self, views: list[str], slices: Sequence[str] = ()) -> list[BundleImage]:
        """The images of the given views, in bundle order; with ``slices``, of the SAX view
        only those slice levels. Falls back to the views' images without the slice filter,
        then to all images, when nothing matches."""
        chosen = [im for im in self.images if im.view in views]
        if slices:
            narrowed = [im for im in chosen if im.view != "SAX" or im.level in slices]
            chosen = narrowed or chosen
        return chosen or list(self.images)

    def question_images(self, question: "Question") -> list[BundleImage]:
        """The images a question is judged on: its views, narrowed to its SAX ``slices``."""
        return self.images_for(question.views, question.slices)


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
