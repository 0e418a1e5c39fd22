"""STOW-RS export with dicomweb-client (PS3.18 §10.5).

Gotcha: ``store_instances`` does not raise when the server rejects some instances;
the response dataset's FailedSOPSequence (0008,1198) says which, with a
FailureReason (0008,1197). We read it ourselves.
"""
from __future__ import annotations

from pathlib import Path

import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset

from plugin.export import ExportError, StoreOutcome


def client(target) -> DICOMwebClient:
    session = requests.Session()
    if target.username:
        session.auth = (target.username, target.password or "")
    headers = {}
    if target.token_file:
        headers["Authorization"] = "Bearer " + Path(target.token_file).expanduser().read_text().strip()
    c = DICOMwebClient(url=target.url, session=session, headers=headers or None, timeout=target.timeout)
    c.set_http_retry_params(retry=False)  # the outbox retries, with back-off, without blocking a flush
    return c


def parse_response(response: Dataset | None, sent: list[str]) -> list[StoreOutcome]:
    """Per-instance outcomes from a STOW-RS response dataset."""
    failed: dict[str, str] = {}
    refs: set[str] = set()
    if response is not None:
        for item in response.get("FailedSOPSequence", []) or []:
            reason = item.get("FailureReason")
            failed[str(item.get("ReferencedSOPInstanceUID", ""))] = (
                f"STOW-RS failure reason 0x{int(reason):04X}" if reason is not None else "STOW-RS failure")
        for item in response.get("ReferencedSOPSequence", []) or []:
            refs.add(str(item.get("ReferencedSOPInstanceUID", "")))
    out = []
    for uid in sent:
        if uid in failed:
            code = failed[uid]
            retryable = "0xA7" in code  # out of resources
            out.append(StoreOutcome(uid, False, code, retryable=retryable))
        elif response is None or uid in refs or not refs:
            out.append(StoreOutcome(uid, True, "stored (STOW-RS)"))
        else:
            out.append(StoreOutcome(uid, False, "not referenced in the STOW-RS response", retryable=True))
    return out


def _response_dataset(response) -> Dataset | None:
    """The STOW-RS response dataset from an HTTP response (DICOM JSON or Part 10 XML-less binary)."""
    try:
        return Dataset.from_json(response.json())
    except Exception:
        pass
    try:
        import io

        import pydicom

        return pydicom.dcmread(io.BytesIO(response.content), force=True)
    except Exception:
        return None


def store(target, datasets: list[Dataset], study_instance_uid: str | None = None) -> list[StoreOutcome]:
    """STOW-RS the datasets in one request (to ``/studies`` or ``/studies/{study_instance_uid}``).

    A 409 Conflict carries the same response dataset as a 200: its FailedSOPSequence
    becomes per-instance failures rather than an exception.

    Raises
    ------
    ExportError
        Connection errors, timeouts, 5xx and 429 are retryable; other 4xx are not.
    """
    if not datasets:
        return []
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    try:
        response = client(target).store_instances(datasets, study_instance_uid=study_instance_uid)
    except requests.exceptions.HTTPError as e:
        code = e.response.status_code if e.response is not None else 0
        body = (e.response.text[:300] if e.response is not None else "").strip()
        if code == 409 and e.response is not None:  # some or all instances failed: read the body
            parsed = _response_dataset(e.response)
            if parsed is not None:
                return parse_response(parsed, sent)
        raise ExportError(f"STOW-RS to {target.url}: HTTP {code} {body}", retryable=code >= 500 or code == 429)
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        raise ExportError(f"STOW-RS to {target.url}: {type(e).__name__}: {e}", retryable=True)
    except OSError as e:  # token file unreadable
        raise ExportError(f"STOW-RS to {target.url}: {e}", retryable=False)
    return parse_response(response, sent)
