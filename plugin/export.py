"""Exporters: the transport side of the outbox (``plugin.outbox`` keeps the rows).

Destinations sit behind one Protocol, ``Exporter.send(datasets) -> [StoreOutcome]``,
with a DIMSE (C-STORE SCU), a DICOMweb (STOW-RS) and a folder implementation, so
the flow code never cares which transport a destination uses (STYLE.md §5, after
mercure's target types).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom import Dataset

from plugin.config import Destination
from plugin.storage import check_uid, write_atomic


class ExportError(Exception):
    """The whole send failed; ``retryable`` says whether trying again later may help."""

    def __init__(self, message: str, *, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class StoreOutcome:
    sop_instance_uid: str
    ok: bool
    status: str  # e.g. "0x0000 Success", "0xA700 Out of resources", "HTTP 409: …"
    retryable: bool = False


class Exporter(Protocol):
    name: str

    def send(self, datasets: list[Dataset]) -> list[StoreOutcome]:
        ...


def dataset_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class DimseExporter:
    def __init__(self, name: str, target, calling_ae: str):
        self.name, self.target, self.calling_ae = name, target, target.calling_ae_title or calling_ae

    def send(self, datasets: list[Dataset]) -> list[StoreOutcome]:
        from plugin.dimse.scu import store

        return store(self.target, datasets, calling_ae=self.calling_ae)


class DicomwebExporter:
    def __init__(self, name: str, target):
        self.name, self.target = name, target

    def send(self, datasets: list[Dataset]) -> list[StoreOutcome]:
        from plugin.dicomweb.stow import store

        return store(self.target, datasets)


class FolderExporter:
    """Writes ``<folder>/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` atomically."""

    def __init__(self, name: str, folder: str):
        self.name, self.folder = name, Path(folder).expanduser()

    def send(self, datasets: list[Dataset]) -> list[StoreOutcome]:
        out = []
        for ds in datasets:
            uid = str(ds.get("SOPInstanceUID", ""))
            try:
                study = check_uid(ds.get("StudyInstanceUID"), "(0020,000D) StudyInstanceUID")
                sop = check_uid(uid, "(0008,0018) SOPInstanceUID")
                write_atomic(self.folder / study / f"{sop}.dcm", dataset_bytes(ds))
                out.append(StoreOutcome(sop, True, "written"))
            except ValueError as e:
                out.append(StoreOutcome(uid, False, str(e), retryable=False))
            except OSError as e:
                out.append(StoreOutcome(uid, False, f"cannot write: {e}", retryable=True))
        return out


def exporter_for(name: str, dest: Destination, *, calling_ae: str) -> Exporter:
    if dest.dimse is not None:
        return DimseExporter(name, dest.dimse, calling_ae)
    if dest.dicomweb is not None:
        return DicomwebExporter(name, dest.dicomweb)
    return FolderExporter(name, dest.folder)
