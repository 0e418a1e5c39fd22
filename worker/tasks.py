"""The three tasks of a job: prepare [node] → infer [gpu] → report [node].

Node-side tasks take ids and re-read the database; the GPU task takes the bundle
and returns the inference result, touching neither the store nor the database.
Every task is idempotent and named explicitly.

Transient errors — the database or the broker briefly away (PostgreSQL restarting,
SQLite busy, a lost connection) — are retried by Celery with exponential back-off
(:data:`TRANSIENT`, :data:`RETRY`). A retry is the same task of the same chain
(``root_id``), so the chain guard of :func:`plugin.jobs.set_state` still holds, and
running a stage again replaces what it wrote (deterministic UIDs, unique outbox rows).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from contextlib import contextmanager

from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from plugin import db
from plugin.storage import write_atomic
from worker.app import app, get_settings, var_dir
from worker.bundle import AnalysisBundle, InferenceResult

log = logging.getLogger("cmr_ai.tasks")

#: errors that go away by themselves: retried (node-side tasks), never a failed job
TRANSIENT = (OperationalError, InterfaceError, BrokerError)
#: Celery options of the node-side tasks: retry TRANSIENT errors after ~2, 4, 8 … 60 s (~6 min in all)
RETRY = dict(autoretry_for=TRANSIENT, retry_backoff=2, retry_backoff_max=60, retry_jitter=True, max_retries=10)


@contextmanager
def job_stage(task, settings, job_id: int, stage: str):
    """Turn an unexpected error of a node-side stage into a failed job with the reason.

    Database hiccups (SQLite busy, PostgreSQL restarting: :data:`TRANSIENT`) go on to
    Celery, which retries the task (:data:`RETRY`); a job is never left half-way in
    PREPARING or REPORTING without a reason.
    """
    from plugin import jobs

    chain_id = task.request.root_id
    try:
        yield
    except (Ignore, Retry):
        raise
    except TRANSIENT as e:
        log.warning("%s: job %s: transient error, retried (%d so far): %s", stage, job_id, task.request.retries, e)
        raise
    except SoftTimeLimitExceeded:
        jobs.fail(settings, job_id, f"{stage}: time limit exceeded", chain_id=chain_id)
        raise Ignore()
    except Exception as e:
        log.exception("%s: job %s failed", stage, job_id)
        jobs.fail(settings, job_id, f"{stage}: {type(e).__name__}: {e}", chain_id=chain_id)
        raise Ignore()


def bundle_path(settings, job_id: int) -> Path:
    return var_dir(settings) / "bundles" / f"job-{job_id}.json"


def results_dir(settings, study_uid: str) -> Path:
    return var_dir(settings) / "results" / study_uid


def template_hash(template) -> str:
    """SHA-256 of the template's YAML file, part of the model version; "" when it has no file."""
    if not getattr(template, "source", None):
        return ""
    return hashlib.sha256(Path(template.source).read_bytes()).hexdigest()


def record_result(s, job_row, result: InferenceResult) -> None:
    """Store the inference result and its audit row on ``job_row`` in session ``s`` (one transaction)."""
    job_row.result_json = result.model_dump_json(exclude={"audit"})
    job_row.model_fingerprint = result.model_fingerprint
    db.record_audit(s, job_row.id, model=result.model, model_fingerprint=result.model_fingerprint,
                    device=result.device, quantization=result.quantization, audit=result.audit)


@app.task(name="cmr_ai.prepare", bind=True, **RETRY)
def prepare(self, job_id: int) -> dict:
    """Classify the study's series, pick phases and slices, render the analysis bundle."""
    from plugin import jobs
    from plugin.cardiac import PrepareError, analyse_paths
    from plugin.cardiac.context import study_context
    from plugin.reports.template import load_template

    settings = get_settings()
    chain_id = self.request.root_id
    job = jobs.set_state(settings, job_id, db.JobState.PREPARING, chain_id=chain_id)
    if job is None:
        log.info("prepare: job %s is finished, gone or sent again; nothing to do", job_id)
        raise Ignore()
    t0 = time.monotonic()
    with job_stage(self, settings, job_id, "prepare"):
        with db.session_scope(settings.database.url) as s:
            study = s.get(db.Study, job.study_id)
            study_uid = study.study_instance_uid
            paths = [i.path for se in study.series for i in se.instances]
        try:
            template = load_template(job.template, settings.templates_dir)
            _study, _cls, images, limitations = analyse_paths(paths)
        except PrepareError as e:
            jobs.fail(settings, job_id, f"prepare: {e}", chain_id=chain_id)
            raise Ignore()
        bundle = AnalysisBundle(job_id=job_id, study_instance_uid=study_uid, model=job.model,
                                template=job.template, template_hash=template_hash(template),
                                questions=template.questions(), images=images,
                                impression=template.impression, limitations=limitations,
                                clinical_context=study_context(paths))
        data = bundle.model_dump(mode="json")
        write_atomic(bundle_path(settings, job_id), json.dumps(data).encode())
        if jobs.set_state(settings, job_id, db.JobState.INFERRING, chain_id=chain_id) is None:
            log.info("prepare: job %s was finished or sent again meanwhile; stopping this chain", job_id)
            raise Ignore()
    log.info("prepare: job %s: %d images from %d instances in %.1f s; limitations: %s", job_id, len(images),
             len(paths), time.monotonic() - t0, "; ".join(limitations) or "none")
    return data


@app.task(name="cmr_ai.infer", bind=True)
def infer(self, bundle_data: dict) -> dict:
    """Run the model on the bundle. Needs only the broker and the model directory."""
    bundle = AnalysisBundle.model_validate(bundle_data)
    settings = get_settings()
    log.info("infer: job %s: started (priority %s%s)", bundle.job_id, self.request.delivery_info.get("priority"),
             ", delivered again" if self.request.delivery_info.get("redelivered") else "")
    try:
        from worker.demo_model import resolve_model_path
        from worker.model.engine import get_engine, load_calibration, run_bundle

        mc = settings.models[bundle.model]
        engine = get_engine(resolve_model_path(mc.path), quantization=mc.quantization, device=mc.device,
                            adapter=mc.adapter)
        result = run_bundle(engine, bundle, bundle.model, calibration=load_calibration(mc.calibration))
        from plugin.reports.template import load_template
        from worker.safety import apply_safety

        template = load_template(bundle.template, settings.templates_dir)
        result, safety = apply_safety(engine, bundle, result, template, probe=settings.safety.probe)
    except SoftTimeLimitExceeded:
        return {"job_id": bundle.job_id, "error": "infer: time limit exceeded"}
    except Exception as e:  # a model that cannot load or run: fail the job with the reason
        log.exception("infer: job %s failed", bundle.job_id)
        return {"job_id": bundle.job_id, "error": f"infer: {type(e).__name__}: {e}"}
    data = result.model_dump(mode="json")
    data["safety"] = safety.model_dump(mode="json")  # read back by report (InferenceResult ignores it)
    return data


@app.task(name="cmr_ai.report", bind=True, **RETRY)
def report(self, result_data: dict) -> None:
    """Build the SR, the narrative SR, the SC and the GSPS; put them in the outbox; send."""
    import pydicom

    from plugin import jobs, outbox
    from plugin.export import dataset_bytes
    from plugin.reports.pr import build_presentation_state
    from plugin.reports.sc import build_secondary_capture
    from plugin.reports.sr import build_measurement_report, build_narrative_report
    from plugin.reports.template import load_template

    settings = get_settings()
    job_id = int(result_data["job_id"])
    chain_id = self.request.root_id
    if "error" in result_data:
        jobs.fail(settings, job_id, result_data["error"], chain_id=chain_id)
        return
    job = jobs.set_state(settings, job_id, db.JobState.REPORTING, chain_id=chain_id)
    if job is None:  # finished (a redelivered report after DONE), gone, or superseded by a newer chain
        log.info("report: job %s is finished, gone or sent again; nothing to do", job_id)
        raise Ignore()
    with job_stage(self, settings, job_id, "report"):
        from worker.safety import SafetyReport, notify_critical

        result = InferenceResult.model_validate(result_data)
        safety = SafetyReport.model_validate(result_data["safety"]) if result_data.get("safety") else None
        bundle = AnalysisBundle.model_validate_json(bundle_path(settings, job_id).read_text())
        template = load_template(job.template, settings.templates_dir)
        uids = {im.source.sop_instance_uid for im in bundle.images}
        with db.session_scope(settings.database.url) as s:
            rows = s.scalars(select(db.Instance).where(db.Instance.sop_instance_uid.in_(uids))).all()
            paths = {r.sop_instance_uid: r.path for r in rows}
        sources = {uid: pydicom.dcmread(p, stop_before_pixels=True) for uid, p in paths.items()}
        missing = uids - set(sources)
        if missing:
            jobs.fail(settings, job_id, f"report: source instances no longer in the store: {sorted(missing)[:3]}",
                      chain_id=chain_id)
            raise Ignore()
        lim = list(bundle.limitations)
        rv = job.rules_version
        objects = [("sr", build_measurement_report(template, result, bundle.images, sources, limitations=lim,
                                                   safety=safety, rules_version=rv)),
                   ("text-sr", build_narrative_report(template, result, bundle.images, sources, limitations=lim,
                                                      safety=safety, rules_version=rv)),
                   ("sc", build_secondary_capture(template, result, bundle.images, sources, safety=safety,
                                                  rules_version=rv)),
                   ("pr", build_presentation_state(template, result, bundle.images, sources, safety=safety,
                                                   rules_version=rv))]
        out = results_dir(settings, bundle.study_instance_uid)
        written = []
        for kind, ds in objects:
            path = out / f"{kind}-{ds.SOPInstanceUID}.dcm"
            write_atomic(path, dataset_bytes(ds))
            written.append((kind, str(ds.SOPInstanceUID), str(path)))
        with db.session_scope(settings.database.url) as s:
            job_row = s.get(db.Job, job_id)
            if job_row.state != db.JobState.REPORTING or jobs.superseded(job_row, chain_id):
                log.info("report: job %s moved on meanwhile (%s, chain %s): its results are not queued again",
                         job_id, job_row.state.value, job_row.celery_id)
                raise Ignore()
            # one row per object and destination; an object the destination already has
            # (same UID, same content) is recorded as delivered without sending it again
            outbox.enqueue(s, job_row, job_row.destination_list, written)
            record_result(s, job_row, result)
            if safety is not None and safety.criticals:  # dashboards and re-runs see it first
                job_row.priority = max(job_row.priority or 0, 9)
            job_row.state = db.JobState.EXPORTING
    log.info("report: job %s: %s", job_id, ", ".join(f"{k} {p}" for k, _, p in written))
    if safety is not None and safety.criticals:
        log.warning("job %s: critical findings need urgent review: %s", job_id,
                    ", ".join(f"{f}={o}" for f, o in safety.criticals))
        notify_critical(safety.criticals, job_id, settings.safety.critical_hook)
    try:  # the results are committed: a database hiccup here is the node's outbox loop's to finish
        outbox.flush(settings, job_id)
        outbox.settle_job(settings, job_id)
    except TRANSIENT as e:
        log.warning("report: job %s: sending left to the outbox loop: %s", job_id, e)
