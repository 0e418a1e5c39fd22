"""Export the inference audit table (``plugin.db.Audit``) for review: ``cmr-ai audit export``.

Two formats, chosen by the output file's suffix:

``.jsonl``
    JSON Lines, one audit row per line with its JSON columns as nested objects. Always
    available.
``.parquet``
    Apache Parquet via ``pyarrow`` (not a dependency of cmr-ai: install it to use this);
    the JSON columns are JSON *strings*, since their keys (finding and option ids) differ
    between templates.
"""
from __future__ import annotations

import json
import os
from datetime import date, datetime, time
from pathlib import Path
from typing import Union

from sqlalchemy import select

from plugin import db

__all__ = ["AuditExportError", "FORMATS", "export_audit", "read_since"]

#: Output suffix -> format name.
FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}


class AuditExportError(ValueError):
    """The export cannot be written as asked; the message names the argument and value."""


def read_since(url: str, since: Union[date, datetime]) -> list[dict]:
    """Audit rows created at or after ``since`` (a date means its 00:00 UTC), oldest first."""
    start = since if isinstance(since, datetime) else datetime.combine(since, time.min)
    with db.session_scope(url) as s:
        rows = s.scalars(select(db.Audit).where(db.Audit.created_at >= start)
                         .order_by(db.Audit.created_at, db.Audit.id)).all()
        return [r.as_dict() for r in rows]


def export_audit(url: str, since: Union[date, datetime], out: Union[str, Path]) -> int:
    """Write the audit rows since ``since`` to ``out``; return how many.

    Parameters
    ----------
    url:
        The SQLAlchemy database URL (``settings.database.url``).
    since:
        First day (UTC) to export.
    out:
        Output file; its suffix picks the format (:data:`FORMATS`). Written to a
        temporary sibling and renamed, so a failed export leaves no half file.

    Raises
    ------
    AuditExportError
        For an unknown suffix, or ``.parquet`` when ``pyarrow`` is not installed.
    """
    out = Path(out)
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise AuditExportError(f"Argument 'OUT' must end in {' or '.join(FORMATS)}, got {str(out)!r}")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise AuditExportError(
                f"cannot write {str(out)!r}: Parquet needs the 'pyarrow' package, which is not installed; "
                "install it or export to a .jsonl file") from None
    rows = read_since(url, since)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if fmt == "jsonl":
            with tmp.open("w", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps(r, sort_keys=True) + "\n")
        else:
            _write_parquet(rows, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(rows)


def _write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    scalar = ["id", "job_id", "created_at", "model", "model_fingerprint", "device", "quantization", "template"]
    columns: dict[str, list] = {k: [r[k] for r in rows] for k in scalar}
    for col in db.Audit.JSON_COLUMNS:
        columns[col] = [json.dumps(r[col], sort_keys=True) for r in rows]
    schema = pa.schema([(k, pa.int64() if k in ("id", "job_id") else pa.string()) for k in columns])
    pq.write_table(pa.table(columns, schema=schema), str(path))
