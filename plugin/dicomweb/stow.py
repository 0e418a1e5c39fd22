"""STOW-RS export with dicomweb-client (PS3.18 §10.5 Store Transaction).

Gotchas this module handles, all seen with real servers:

- ``DICOMwebClient.store_instances`` does not raise when the server refuses some
  instances with 200/202: the Store Instances Response (PS3.18 §10.5.3) says which,
  in (0008,1198) FailedSOPSequence with a (0008,1197) FailureReason, and which were
  stored, in (0008,1199) ReferencedSOPSequence. We read it ourselves.
- An instance in neither sequence was not stored either: Orthanc answers 200 with
  both sequences empty when its storage is full.
- A 409 (some or all failed) or 400 carries the same response body, and Orthanc
  sends it without a Content-Type; dicomweb-client raises ``HTTPError`` and only
  parses bodies whose Content-Type is exactly ``application/dicom+json``. We keep
  the raw HTTP response (a session hook) and parse its body whatever the header says.
- dicomweb-client retries 429/503/504 with exponential back-off inside the call
  (up to ~15 s); the outbox has its own back-off, so that retry is switched off.
- A 202 Accepted, or a (0008,1196) WarningReason on a referenced instance, means
  stored *with a warning* (coerced or discarded elements): delivered, and the
  outcome says so (``warning=True``) so that the outbox records it.

:func:`instance_exists` is the QIDO-RS check that confirms the server kept what
was sent (a destination's ``verify: qido``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset

from plugin.config import DicomwebTarget
from plugin.export import (ExportError, StoreOutcome, describe_status, part10,
                           retryable_status)
from plugin.storage import check_uid

__all__ = ["client", "instance_exists", "parse_response", "store"]

log = logging.getLogger("cmr_ai.stow")


def client(target: DicomwebTarget, session: Optional[requests.Session] = None) -> DICOMwebClient:
    """A DICOMwebClient for the target: basic auth, bearer token from ``token_file``, timeout.

    Raises
    ------
    OSError
        When ``token_file`` cannot be read.
    """
    session = session or requests.Session()
    username, password, token_file = target.credentials
    if username:
        session.auth = (username, password or "")
    headers = None
    if token_file:
        token = Path(token_file).expanduser().read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
    c = DICOMwebClient(url=target.url, session=session, headers=headers, timeout=target.timeout)
    c.set_http_retry_params(retry=False)  # the outbox retries, with its own back-off
    return c


def _body_dataset(response: Optional[requests.Response]) -> Optional[Dataset]:
    """The Store Instances Response in a DICOM JSON body, or None if there is none."""
    if response is None or not response.content:
        return None
    try:
        doc = json.loads(response.content)
    except ValueError:
        return None
    if isinstance(doc, list) and len(doc) == 1:  # some servers wrap the dataset in an array
        doc = doc[0]
    if not isinstance(doc, dict):
        return None
    try:
        return Dataset.from_json(doc)
    except Exception:  # not DICOM JSON
        return None


def _is_store_response(ds: Optional[Dataset]) -> bool:
    return ds is not None and ("FailedSOPSequence" in ds or "ReferencedSOPSequence" in ds)


def _reason(item: Dataset, keyword: str) -> Optional[int]:
    v = item.get(keyword)
    try:
        return int(v) if v is not None and v != "" else None
    except (TypeError, ValueError):
        return None


def parse_response(response: Optional[Dataset], sent: list[str], *, http_status: int = 200) -> list[StoreOutcome]:
    """Per-instance outcomes from a Store Instances Response (PS3.18 §10.5.3).

    Parameters
    ----------
    response:
        The response dataset; None when the server sent no body at all.
    sent:
        SOP Instance UIDs sent, in order; one outcome is returned for each.
    http_status:
        The HTTP status of the response: an instance the response does not mention
        is retryable after a 2xx (the server dropped it: e.g. storage full) and not
        after a 4xx (it refused the request).

    Returns
    -------
    list[StoreOutcome]
        In FailedSOPSequence: failed, "STOW-RS failure reason 0xXXXX <meaning>"; retryable for
        0xA7xx. In ReferencedSOPSequence: stored, with ``warning`` when it has a
        WarningReason or the response is a 202 Accepted (PS3.18 §10.5.3: some
        instances stored with warnings). In neither: failed. With no body at all
        and a 2xx: stored (nothing to check). ``code`` is ``"HTTP <status>"`` plus
        the instance's FailureReason or WarningReason in hex, if any.
    """
    failed: dict[str, Optional[int]] = {}
    stored: dict[str, Optional[int]] = {}
    if response is not None:
        for item in response.get("FailedSOPSequence", None) or []:
            failed[str(item.get("ReferencedSOPInstanceUID", "") or "")] = _reason(item, "FailureReason")
        for item in response.get("ReferencedSOPSequence", None) or []:
            stored[str(item.get("ReferencedSOPInstanceUID", "") or "")] = _reason(item, "WarningReason")
    out = []
    http = f"HTTP {http_status}"
    # 202 Accepted: some instances were stored with warnings, or some failed. When the
    # response names neither, every stored instance is taken as warned about.
    unexplained_202 = http_status == 202 and not failed and not any(stored.values())
    for uid in sent:
        if uid in failed:
            code = failed[uid]
            if code is None:
                out.append(StoreOutcome(uid, False, f"STOW-RS failure (no FailureReason, HTTP {http_status})",
                                        retryable=False, code=http))
            else:
                out.append(StoreOutcome(uid, False, f"STOW-RS failure reason {describe_status(code)}",
                                        retryable=retryable_status(code), code=f"{http} 0x{code:04X}"))
        elif uid in stored:
            warning = stored[uid]
            text = f"stored (STOW-RS HTTP {http_status}"
            if warning:
                text += f", warning {describe_status(warning)})"
            elif unexplained_202:
                text += " Accepted: stored with warnings, no WarningReason given)"
            else:
                text += ")"
            out.append(StoreOutcome(uid, True, text, code=http + (f" 0x{warning:04X}" if warning else ""),
                                    warning=bool(warning) or unexplained_202))
        elif response is None and 200 <= http_status < 300:
            out.append(StoreOutcome(uid, True, f"stored (STOW-RS HTTP {http_status}, no response body to check)",
                                    code=http, warning=http_status == 202))
        else:
            out.append(StoreOutcome(uid, False, f"STOW-RS HTTP {http_status}: the server's response neither "
                                    "references nor lists it as failed; it was not stored",
                                    retryable=http_status < 400, code=http))
    return out


def _http_error_text(resp: Optional[requests.Response]) -> str:
    if resp is None:
        return "HTTP error"
    body = " ".join((resp.text or "")[:300].split())
    return f"HTTP {resp.status_code} {resp.reason or ''}".rstrip() + (f": {body}" if body else "")


def store(target: DicomwebTarget, datasets: list[Dataset], *,
          study_instance_uid: Optional[str] = None) -> list[StoreOutcome]:
    """STOW-RS the datasets in one request.

    Parameters
    ----------
    target:
        The origin server (its base URL, e.g. ``https://pacs/dicom-web``), credentials, timeout.
    datasets:
        The instances; each is sent as a PS3.10 file in its own transfer syntax
        (Explicit VR Little Endian when built in memory). They are not modified.
    study_instance_uid:
        When given, POST to ``{url}/studies/{uid}``: the server then refuses any
        instance of another study (Orthanc: FailureReason 0x0110).

    Returns
    -------
    list[StoreOutcome]
        One per dataset, in order (see :func:`parse_response`). Datasets without
        SOP Class or Instance UID are failures and are not sent.

    Raises
    ------
    ExportError
        Connection errors, timeouts, HTTP 5xx and 429 are retryable; other HTTP
        errors without a Store Instances Response body (401, 403, 404, …), an
        unreadable token file and a malformed ``study_instance_uid`` are not.
    """
    if not datasets:
        return []
    payloads: list[Dataset] = []
    early: dict[int, StoreOutcome] = {}
    for i, ds in enumerate(datasets):
        try:
            payloads.append(part10(ds))
        except ValueError as e:
            early[i] = StoreOutcome(str(ds.get("SOPInstanceUID", "") or ""), False, f"not sent: {e}",
                                    code="not sent")
    if study_instance_uid is not None:
        try:
            study_instance_uid = check_uid(study_instance_uid, "study_instance_uid")
        except ValueError as e:
            raise ExportError(f"STOW-RS to {target.url}: {e}", retryable=False, code="bad request") from None
    results = iter(_send(target, payloads, study_instance_uid) if payloads else [])
    return [early[i] if i in early else next(results) for i in range(len(datasets))]


def _send(target: DicomwebTarget, payloads: list[Dataset], study_instance_uid: Optional[str]) -> list[StoreOutcome]:
    sent = [str(ds.SOPInstanceUID) for ds in payloads]
    where = f"STOW-RS to {target.url}" + (f"/studies/{study_instance_uid}" if study_instance_uid else "")
    seen: list[requests.Response] = []
    session = requests.Session()
    session.hooks["response"].append(lambda r, *args, **kwargs: seen.append(r))
    try:
        c = client(target, session)
    except OSError as e:
        raise ExportError(f"{where}: cannot read token_file: {e}", retryable=False, code="token_file") from None
    except ValueError as e:  # dicomweb-client refuses the URL
        raise ExportError(f"{where}: {e}", retryable=False, code="bad URL") from None
    try:
        returned: Optional[Dataset] = c.store_instances(payloads, study_instance_uid=study_instance_uid)
    except requests.exceptions.HTTPError as e:
        resp = e.response
        code = resp.status_code if resp is not None else 0
        body = _body_dataset(resp)
        if 400 <= code < 500 and code != 429 and _is_store_response(body):
            # 409 "some or all failed" (or 400) with a Store Instances Response: per instance
            outcomes = parse_response(body, sent, http_status=code)
            _log(where, outcomes)
            return outcomes
        raise ExportError(f"{where}: {_http_error_text(resp)}", retryable=code >= 500 or code == 429,
                          code=f"HTTP {code}" if code else "HTTP error") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        raise ExportError(f"{where}: cannot reach the server: {type(e).__name__}: {e}", retryable=True,
                          code="timeout" if isinstance(e, requests.exceptions.Timeout) else "no connection") from None
    except requests.exceptions.RequestException as e:  # broken transfer, too many redirects …
        raise ExportError(f"{where}: {type(e).__name__}: {e}", retryable=True, code=type(e).__name__) from None
    except Exception as e:
        if not seen:  # nothing went out: a dataset dicomweb-client could not encode
            raise ExportError(f"{where}: not sent: {type(e).__name__}: {e}", retryable=False,
                              code="not sent") from None
        returned = None  # it could not read a 2xx answer (e.g. no Content-Type): we read it below
    finally:
        session.close()
    resp = seen[-1] if seen else None
    code = resp.status_code if resp is not None else 200
    body = _body_dataset(resp)
    if body is None and returned is not None and len(returned) > 0:
        body = returned  # an XML response, parsed by dicomweb-client
    if body is None and resp is not None and resp.content:
        raise ExportError(f"{where}: HTTP {code} with a response that is not a Store Instances Response "
                          f"({resp.headers.get('Content-Type', 'no Content-Type')}): "
                          f"{resp.text[:200]!r}", retryable=False, code=f"HTTP {code}")
    outcomes = parse_response(body, sent, http_status=code)
    _log(where, outcomes)
    return outcomes


def _log(where: str, outcomes: list[StoreOutcome]) -> None:
    for o in outcomes:
        if not o.ok:
            log.warning("%s: %s %s", where, o.sop_instance_uid, o.status)
        elif o.warning:
            log.warning("%s: %s stored with a warning: %s", where, o.sop_instance_uid, o.status)


def instance_exists(target: DicomwebTarget, study_instance_uid: str, series_instance_uid: str,
                    sop_instance_uid: str) -> bool:
    """QIDO-RS ``studies/{study}/series/{series}/instances?SOPInstanceUID=…`` (PS3.18 §10.6): is it there?

    Raises
    ------
    ExportError
        When the server cannot be asked (connection errors, timeouts, HTTP 5xx and
        429 are retryable; other HTTP errors are not), or a UID is malformed.
    """
    where = f"QIDO-RS to {target.url}"
    try:
        study = check_uid(study_instance_uid, "(0020,000D) StudyInstanceUID")
        series = check_uid(series_instance_uid, "(0020,000E) SeriesInstanceUID")
        sop = check_uid(sop_instance_uid, "(0008,0018) SOPInstanceUID")
    except ValueError as e:
        raise ExportError(f"{where}: {e}", retryable=False, code="bad UID") from None
    session = requests.Session()
    try:
        c = client(target, session)
    except OSError as e:
        session.close()
        raise ExportError(f"{where}: cannot read token_file: {e}", retryable=False, code="token_file") from None
    except ValueError as e:  # dicomweb-client refuses the URL
        session.close()
        raise ExportError(f"{where}: {e}", retryable=False, code="bad URL") from None
    try:
        found = c.search_for_instances(study_instance_uid=study, series_instance_uid=series,
                                       search_filters={"SOPInstanceUID": sop}, fields=["00080018"])
    except requests.exceptions.HTTPError as e:
        code = e.response.status_code if e.response is not None else 0
        raise ExportError(f"{where}: {_http_error_text(e.response)}", retryable=code >= 500 or code == 429,
                          code=f"HTTP {code}" if code else "HTTP error") from None
    except requests.exceptions.RequestException as e:
        raise ExportError(f"{where}: cannot reach the server: {type(e).__name__}: {e}", retryable=True,
                          code="no connection") from None
    finally:
        session.close()
    for item in found or []:
        values = (item.get("00080018") or {}).get("Value") or []
        if sop in [str(v) for v in values]:
            return True
    return False
