"""Group commit of the instance index (plugin/ingest.py), against a real SQLite database:
requests waiting together are committed in one transaction, one bad request fails alone,
duplicates and re-opened studies are counted as the per-instance path did, and our own
outputs coming back do not re-open a study."""
from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from plugin import db
from plugin.ingest import Indexer, IndexRequest

MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.33"
INFO = {"PatientID": "P", "StudyDescription": "Cardiac", "AccessionNumber": "A", "Modality": "MR",
        "SeriesDescription": "cine"}


@pytest.fixture()
def url(tmp_path):
    u = f"sqlite:///{tmp_path / 'ingest.db'}"
    db.get_engine(u)  # creates the schema
    return u


def req(i: int, study: str = "1.2.3", series: str = "1.2.3.1", sop_class: str = MR, info=INFO, sop=None):
    return IndexRequest(study, series, sop or f"1.2.3.1.{i}", sop_class, "1.2.840.10008.1.2.1", f"/x/{i}.dcm",
                        1000 + i, dict(info) if info is not None else {}, 1, "MODALITY", "127.0.0.1")


def counts(url):
    with db.session_scope(url) as s:
        return ({st.study_instance_uid: (st.n_instances, st.state) for st in s.scalars(select(db.Study))},
                s.scalar(select(func.count()).select_from(db.Instance)),
                s.scalar(select(func.count()).select_from(db.Series)))


def test_requests_waiting_together_share_one_commit(url):
    ix = Indexer(url)
    reqs = [req(i, series=f"1.2.3.{i % 3}") for i in range(50)]
    for r in reqs[:-1]:  # queued while another handler holds the write lock: all wait together
        ix._q.put(r)
    ix.index(reqs[-1])  # this handler takes the lock and commits them all, its own included
    assert all(r.future.done() and r.future.exception() is None for r in reqs)
    assert (ix.batches, ix.indexed) == (1, 50)
    studies, n_inst, n_series = counts(url)
    assert studies == {"1.2.3": (50, db.StudyState.RECEIVING)} and n_inst == 50 and n_series == 3


def test_concurrent_senders_all_indexed_once(url):
    ix = Indexer(url)
    errors = []

    def sender(k):
        try:
            for i in range(40):
                ix.index(req(k * 100 + i, study=f"1.2.{k}", series=f"1.2.{k}.1"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    studies, n_inst, _ = counts(url)
    assert n_inst == 160 and {k: v[0] for k, v in studies.items()} == {f"1.2.{k}": 40 for k in range(4)}
    assert ix.indexed == 160


def test_a_bad_request_fails_alone(url):
    ix = Indexer(url)
    good = [req(i) for i in range(5)]
    bad = req(99, study="9.9.9", info={})  # no study attributes: KeyError while writing
    for r in good[:2] + [bad] + good[2:]:
        ix._q.put(r)
    ix.flush()
    for r in good:
        r.future.result(0)
    with pytest.raises(KeyError):
        bad.future.result(0)
    with pytest.raises(KeyError):  # and through index(): the handler sees the error
        ix.index(req(100, study="9.9.9", info={}))
    studies, n_inst, _ = counts(url)
    assert studies == {"1.2.3": (5, db.StudyState.RECEIVING)} and n_inst == 5


def test_duplicates_reopen_and_own_outputs(url):
    ix = Indexer(url)
    ix.index(req(1))
    dup_a, dup_b = req(2), req(2)  # the same instance twice in one batch, and once more later
    ix._q.put(dup_a), ix._q.put(dup_b)
    ix.flush()
    dup_a.future.result(0), dup_b.future.result(0)
    ix.index(req(1))
    assert counts(url)[0] == {"1.2.3": (2, db.StudyState.RECEIVING)} and counts(url)[1] == 2
    with db.session_scope(url) as s:  # the study was analysed: complete, our SR in the outbox
        st = s.scalar(select(db.Study))
        st.state = db.StudyState.COMPLETE
        job = db.Job(study_id=st.id, rule="r", template="t", model="m", destinations="pacs",
                     state=db.JobState.DONE)
        s.add(job)
        s.flush()
        s.add(db.Export(job_id=job.id, destination="pacs", sop_instance_uid="9.8.7", path="/r/sr.dcm", kind="sr"))
    ix.index(req(3, sop_class=SR, sop="9.8.7", series="9.8"))  # our own SR routed back to us
    assert counts(url)[0] == {"1.2.3": (3, db.StudyState.COMPLETE)}
    ix.index(req(4))  # a new image from the modality re-opens it
    assert counts(url)[0] == {"1.2.3": (4, db.StudyState.RECEIVING)}


def test_a_new_file_whose_row_exists_is_indexed_by_the_lookup_path(url):
    """``is_new`` (the store had no file) skips the row lookup; a row left behind by a file
    deleted by hand makes the INSERT fail, and the request is retried with the lookup."""
    ix = Indexer(url)
    ix.index(req(1))
    r = req(1)
    r.is_new = True
    r.size = 4242
    ix.index(r)
    studies, n, _ = counts(url)
    assert n == 1 and studies["1.2.3"][0] == 1
    with db.session_scope(url) as s:
        assert s.scalar(select(db.Instance.size)) == 4242


def test_part10_header_is_what_pydicom_writes():
    """The hand-built File Meta Information equals pydicom's encoding of pynetdicom's meta."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID as IMPL, PYNETDICOM_IMPLEMENTATION_VERSION as VER
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from plugin.storage import part10_header

    for sop_class, sop, ts in ((MR, "1.2.3.45", "1.2.840.10008.1.2.1"),
                               (SR, "1.2.3.4", "1.2.840.10008.1.2.4.50"),
                               ("1.2.840.10008.5.1.4.1.1.4.1", "2.25.1", "1.2.840.10008.1.2")):
        meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop, transfer_syntax=ts)
        assert part10_header(sop_class, sop, ts, IMPL, VER) == b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
