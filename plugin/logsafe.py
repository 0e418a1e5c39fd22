"""PHI kept out of the logs of the node and the workers unless asked for.

PHI, for logs, is what identifies or describes the patient or the encounter:
patient/person attributes (names, IDs, birth date, sex, age, weight, addresses),
accession numbers, institution and physician names, and free-text descriptions
(study, series, reason for the procedure, diagnoses). UIDs are not redacted:
operators need them to find a study in the PACS. See docs/security.md.

Two layers:

* :func:`phi` and :func:`scrub` at the call sites that put values in a message;
* :func:`install` (``cmr-ai serve`` and ``cmr-ai worker``), a safety net for what no
  call site controls: a log-record factory that, unless PHI is enabled, replaces
  every quoted value that is not a UID or a number (``'Doe^John'`` →
  ``'<redacted>'``) in the messages of the loggers that carry dataset values
  (:data:`PRONE`: the C-STORE handler, routing, the cardiac pipeline, jobs and tasks,
  pydicom and Python warnings, Celery), the exception messages of every traceback
  logged by any logger, and the task arguments and return values Celery logs (the
  analysis bundle carries the clinical context). Python warnings go through logging,
  so they are covered too.

``logging.phi: true`` in the config or ``--debug-phi`` on the command line
(``CMR_AI_LOG_PHI=1``, inherited by the embedded worker) turns all of it off.
"""
from __future__ import annotations

import logging
import os
import re
import traceback
from typing import Any, Optional

REDACTED = "<redacted>"
ENV = "CMR_AI_LOG_PHI"

#: Loggers whose messages may carry dataset values: the C-STORE handler and routing
#: (pydicom's exception texts), the cardiac pipeline (series descriptions in its
#: reasons and limitations), jobs and tasks (failure reasons built from those),
#: pydicom and Python warnings (values they found invalid), Celery (task
#: results, exceptions, stdout). A name matches itself and its children. Others
#: (the node, the outbox, the model engine …) log UIDs, names from the config and
#: peers' status texts, which stay readable.
PRONE = ("cmr_ai.scp", "cmr_ai.routing", "cmr_ai.jobs", "cmr_ai.tasks", "plugin.cardiac", "pydicom", "py.warnings",
         "celery")
#: Celery's records whose arguments are a context dict: these keys are dropped or scrubbed.
_CELERY_DROP = ("return_value", "args", "kwargs")
_CELERY_SCRUB = ("exc", "traceback")

_enabled: Optional[bool] = None  # None: not configured; the environment decides
_base_factory = None

# A quoted value as repr() and f"{v!r}" write it: opening quote not inside a word (so
# "can't" is no quote), closing quote not followed by a word character.
_QUOTED = re.compile(r"""(?<![\w'"])(b?)(['"])([^\n]*?)\2(?![\w])""")
_KEEP = re.compile(r"^(?:[0-9]+(?:\.[0-9]+)*|-?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|<redacted>)?$")


def enabled() -> bool:
    """Whether PHI may be written to logs."""
    if _enabled is None:
        return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return _enabled


def configure(phi_enabled: bool) -> None:
    """Set the switch for this process (and, through :data:`ENV`, its children)."""
    global _enabled
    _enabled = bool(phi_enabled) or os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")
    if _enabled:
        os.environ[ENV] = "1"


def phi(value: Any) -> str:
    """``value`` as text for a log message, or ``<redacted>`` (empty values stay empty)."""
    text = "" if value is None else str(value)
    return text if (enabled() or not text) else REDACTED


def scrub(text: Any) -> str:
    """Free text that may embed dataset values (an exception message, a reason): every
    quoted value that is not a UID or a number becomes ``'<redacted>'``; unchanged when
    PHI is enabled."""
    text = "" if text is None else str(text)
    if enabled() or ("'" not in text and '"' not in text):
        return text
    return _QUOTED.sub(lambda m: m.group(0) if _KEEP.match(m.group(3)) else f"{m.group(1)}{m.group(2)}{REDACTED}"
                       f"{m.group(2)}", text)


def exc_text(e: BaseException) -> str:
    """``TypeName: message`` of an exception, the message :func:`scrub`-bed."""
    return f"{type(e).__name__}: {scrub(e)}"


# ---------------------------------------------------------------------------
# the safety net

def _prone(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PRONE)


def _format_exception(exc: BaseException, tb) -> str:
    """A traceback as logging writes it, every exception message scrubbed (the code lines are kept)."""
    te = traceback.TracebackException(type(exc), exc, tb)
    out: list[str] = []

    def emit(t: traceback.TracebackException, depth: int = 0) -> None:
        if depth < 20:
            if t.__cause__ is not None:
                emit(t.__cause__, depth + 1)
                out.append("\nThe above exception was the direct cause of the following exception:\n\n")
            elif t.__context__ is not None and not t.__suppress_context__:
                emit(t.__context__, depth + 1)
                out.append("\nDuring handling of the above exception, another exception occurred:\n\n")
        if t.stack:
            out.append("Traceback (most recent call last):\n")
            out.extend(t.stack.format())
        out.extend(scrub(line) for line in t.format_exception_only())

    emit(te)
    return "".join(out).rstrip("\n")


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Scrub one record in place (see the module docstring); a no-op when PHI is enabled."""
    if enabled():
        return record
    try:
        if record.name.startswith("celery") and isinstance(record.args, dict):
            ctx = dict(record.args)
            for k in _CELERY_DROP:
                if k in ctx:
                    ctx[k] = REDACTED
            for k in _CELERY_SCRUB:
                if isinstance(ctx.get(k), str):
                    ctx[k] = scrub(ctx[k])
            record.args = ctx
            if isinstance(getattr(record, "data", None), dict):
                record.data = ctx
        if _prone(record.name):
            message = record.getMessage()
            record.msg, record.args = scrub(message), None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = _format_exception(record.exc_info[1], record.exc_info[2])
    except Exception:  # noqa: BLE001 - a record that does not format is logging's to report, not ours
        pass
    return record


def install() -> None:
    """Put the safety net in place for this process (idempotent): the record factory, and
    Python warnings through logging (``py.warnings``)."""
    global _base_factory
    logging.captureWarnings(True)
    if _base_factory is not None:
        return
    _base_factory = base = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        return redact_record(base(*args, **kwargs))

    logging.setLogRecordFactory(factory)
