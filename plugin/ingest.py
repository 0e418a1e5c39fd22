"""Group commit of the instance index: many C-STOREs, one database transaction.

The C-STORE handler has already written, fsynced and renamed the instance's file when
it calls :meth:`Indexer.index`; that call blocks until the index row is committed and
only then does the handler answer Success, so nothing is acknowledged that is not on
disk *and* in the database. Whoever holds the write lock commits every request waiting
at that moment (from all associations) in one transaction with SQLAlchemy Core
statements: a single sender pays one short transaction per instance, N senders share
one commit (and its fsync) between them.

Profiled (``python bench/ingest_bench.py --profile``): of 16 ms per instance at
first, ~10 ms were the per-instance ORM session (four SELECTs, flush, commit). Now
the transaction runs on a Core connection with statements built once: for a new
file (the store had none, so no row is expected) it is one INSERT, one conditional
UPDATE that re-opens a closed study, one UPDATE of the study's count and time, and
the commit (~0.7 ms, of which ~0.4 ms the WAL fsync; was 2.2 ms). Study and series
ids are cached after their first row (rows are never deleted while the node runs);
the "is this our own output coming back" lookup runs only for SOP classes we write
(SR, Secondary Capture, presentation state).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

from sqlalchemy import bindparam, select, update

from plugin import db

log = logging.getLogger("cmr_ai.scp")

#: SOP classes of what cmr-ai itself writes: SR (…88.x), SC (…7.x), GSPS (…11.1).
OWN_OUTPUT_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.11.1")
MAX_BATCH = 256


@dataclass
class IndexRequest:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    transfer_syntax: str
    path: str
    size: int
    info: dict
    series_number: Optional[int]
    calling_ae: str
    address: str
    file_changed: bool = True  # False: a duplicate whose stored file was left as it was
    is_new: bool = False  # True: the store had no file of this UID (so no row is expected)
    future: Future = field(default_factory=Future)


class Indexer:
    """The index writer of a node process (see the module docstring).

    Leader-based group commit, no extra thread: a handler queues its request and takes
    the write lock; whoever holds it commits everything queued at that moment, so the
    others find their rows committed when they get the lock (a lone sender pays no
    thread hand-off).
    """

    def __init__(self, db_url: str):
        self.db_url = db_url
        self._q: "queue.SimpleQueue[IndexRequest]" = queue.SimpleQueue()
        self._write_lock = threading.Lock()
        self._studies: dict[str, int] = {}
        self._series: dict[str, int] = {}
        self.batches = self.indexed = 0
        # the statements of the common case, built once (building them was a third of the time)
        studies_t, inst_t = db.Study.__table__, db.Instance.__table__
        self._insert_instances = inst_t.insert()
        self._reopen = update(studies_t).where(
            studies_t.c.id == bindparam("sid"), studies_t.c.state != db.StudyState.RECEIVING).values(
            state=db.StudyState.RECEIVING)
        self._count = update(studies_t).where(studies_t.c.id == bindparam("sid")).values(
            n_instances=studies_t.c.n_instances + bindparam("added"), last_received=bindparam("now"))
        self._count_only = update(studies_t).where(studies_t.c.id == bindparam("sid")).values(
            n_instances=studies_t.c.n_instances + bindparam("added"))
        self._touch = update(studies_t).where(studies_t.c.id == bindparam("sid")).values(
            last_received=bindparam("now"))

    def index(self, req: IndexRequest, timeout: float = 120.0) -> None:
        """Index ``req``; returns once its row is committed (raises what the commit raised)."""
        self._q.put(req)
        deadline = time.monotonic() + timeout
        while not req.future.done():
            left = deadline - time.monotonic()
            if left <= 0 or not self._write_lock.acquire(timeout=left):
                raise TimeoutError(f"index of {req.sop_uid}: database busy for {timeout:g} s")
            try:
                if not req.future.done():
                    self._drain()
            finally:
                self._write_lock.release()
        req.future.result(0)

    def flush(self) -> None:
        """Commit whatever is queued (tests; ``index`` does this itself)."""
        with self._write_lock:
            while not self._q.empty():
                self._drain()

    def _drain(self) -> None:
        batch: list[IndexRequest] = []
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._q.get_nowait())
            except queue.Empty:
                break
        if batch:
            self._commit(batch)

    def _commit(self, batch: list[IndexRequest]) -> None:
        try:
            self._write(batch)
        except Exception as e:  # noqa: BLE001 — every waiter gets the error; caches may be stale
            self._studies.clear()
            self._series.clear()
            if any(r.is_new for r in batch):  # a row without its file (deleted by hand?): look rows up
                for r in batch:
                    r.is_new = False
                self._commit(batch)
                return
            if len(batch) > 1:  # one bad row must not fail the others: retry them one by one
                for r in batch:
                    self._commit([r])
                return
            batch[0].future.set_exception(e)
            return
        self.batches += 1
        self.indexed += len(batch)
        for r in batch:
            r.future.set_result(None)

    def _write(self, batch: list[IndexRequest]) -> None:
        # A Core connection, not an ORM session: for a lone sender this transaction is on the
        # critical path of every C-STORE (session set-up and ORM bookkeeping were ~1.5 ms of it).
        studies_t, series_t, inst_t = db.Study.__table__, db.Series.__table__, db.Instance.__table__
        now = db.utcnow()
        new_studies: dict[str, int] = {}
        new_series: dict[str, int] = {}
        with db.get_engine(self.db_url).begin() as s:
            # study and series ids: cache, else the database, else a new row
            for r in batch:
                sid = self._studies.get(r.study_uid) or new_studies.get(r.study_uid)
                if sid is None:
                    sid = s.scalar(select(studies_t.c.id).where(studies_t.c.study_instance_uid == r.study_uid))
                    if sid is None:
                        sid = s.execute(studies_t.insert().values(
                            study_instance_uid=r.study_uid, patient_id=r.info["PatientID"],
                            study_description=r.info["StudyDescription"],
                            accession_number=r.info["AccessionNumber"], calling_ae=str(r.calling_ae)[:16],
                            source_ip=str(r.address)[:64], first_received=now, last_received=now,
                            state=db.StudyState.RECEIVING, n_instances=0)).inserted_primary_key[0]
                    new_studies[r.study_uid] = sid
                key = r.series_uid
                if self._series.get(key) is None and new_series.get(key) is None:
                    ser = s.scalar(select(series_t.c.id).where(series_t.c.series_instance_uid == key))
                    if ser is None:
                        ser = s.execute(series_t.insert().values(
                            study_id=sid, series_instance_uid=key, modality=r.info["Modality"],
                            series_description=r.info["SeriesDescription"],
                            series_number=r.series_number)).inserted_primary_key[0]
                    new_series[key] = ser
            existing: set[str] = set()
            if not all(r.is_new for r in batch):  # a file just created has no row (else: INSERT fails, retried)
                uids = list({r.sop_uid for r in batch})
                existing = set(s.scalars(select(inst_t.c.sop_instance_uid)
                                         .where(inst_t.c.sop_instance_uid.in_(uids))).all())
            own = set()
            maybe_own = [r.sop_uid for r in batch if r.sop_class.startswith(OWN_OUTPUT_PREFIXES)]
            if maybe_own:  # our own SR/SC/PR coming back must not re-open the study (a forwarded
                # original sent again by the modality is new data and does)
                exp_t = db.Export.__table__
                own = set(s.scalars(select(exp_t.c.sop_instance_uid).where(
                    exp_t.c.sop_instance_uid.in_(maybe_own), exp_t.c.kind != "original")).all())
            added: dict[int, int] = {}
            touched: set[int] = set()
            study_uid_of: dict[int, str] = {}
            rows, seen = [], set()
            for r in batch:
                sid = self._studies.get(r.study_uid) or new_studies[r.study_uid]
                ser = self._series.get(r.series_uid) or new_series[r.series_uid]
                study_uid_of[sid] = r.study_uid
                if r.sop_uid in existing or r.sop_uid in seen:  # one row per SOP Instance UID
                    if r.file_changed:
                        s.execute(update(inst_t).where(inst_t.c.sop_instance_uid == r.sop_uid).values(
                            size=r.size, transfer_syntax_uid=r.transfer_syntax, received_at=now))
                else:
                    seen.add(r.sop_uid)
                    rows.append(dict(series_id=ser, sop_instance_uid=r.sop_uid, sop_class_uid=r.sop_class,
                                     transfer_syntax_uid=r.transfer_syntax, path=r.path, size=r.size,
                                     received_at=now))
                    added[sid] = added.get(sid, 0) + 1
                if r.sop_uid not in own:
                    touched.add(sid)
            if rows:
                s.execute(self._insert_instances, rows)
            for sid in set(added) | touched:
                if sid in touched:
                    # re-open a study the stability loop had closed (a conditional UPDATE, no SELECT)
                    if s.execute(self._reopen, {"sid": sid}).rowcount:
                        log.info("study %s received new instances after it was complete: re-opened",
                                 study_uid_of[sid])
                if sid in added and sid in touched:
                    s.execute(self._count, {"sid": sid, "added": added[sid], "now": now})
                elif sid in added:  # only our own output's first copy: counted, the study stays as it is
                    s.execute(self._count_only, {"sid": sid, "added": added[sid]})
                else:
                    s.execute(self._touch, {"sid": sid, "now": now})
        # committed: remember the ids
        self._studies.update(new_studies)
        self._series.update(new_series)

