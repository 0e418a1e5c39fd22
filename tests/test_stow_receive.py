"""STOW-RS into the node (``POST /dicom-web/studies`` on the admin HTTP port, plugin/dicomweb/receiver.py).

Unit tests of the streaming multipart reader and of the request body reader, then one
real node (``cmr-ai serve --no-worker``, admin port and token file) that real clients
push into: dicomweb-client, curl (Content-Length and chunked) and Orthanc's DICOMweb
plugin (``/dicom-web/servers/{name}/stow``). Every instance the node references in its
response must be on disk with the data set bytes that were sent, and in the index.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import select

from peers import free_port
from plugin import db
from plugin.api import AdminAPI, BadBody, BodyReader
from plugin.dicomweb.receiver import MultipartError, MultipartReader, PartTooLarge, TruncatedBody
from plugin.dicomweb.stow import parse_response
from plugin.phantom import write_study
from plugin.receive import read_file_meta

CURL = "/usr/bin/curl"
CT = 'multipart/related; type="application/dicom"; boundary={}'


# ---------------------------------------------------------------------------
# helpers

def multipart(parts: list[bytes | tuple[str, bytes]], boundary: str = "b0und", *, preamble: bytes = b"",
              epilogue: bytes = b"", leading_crlf: bool = False, close: bool = True) -> bytes:
    """A multipart/related body; a part is its bytes (Content-Type application/dicom) or (content type, bytes)."""
    out = io.BytesIO()
    out.write(preamble)
    for n, p in enumerate(parts):
        ctype, data = p if isinstance(p, tuple) else ("application/dicom", p)
        out.write((b"\r\n" if n or leading_crlf or preamble else b"") + f"--{boundary}\r\n".encode())
        if ctype is not None:
            out.write(f"Content-Type: {ctype}\r\n".encode())
        out.write(b"\r\n" + data)
    if close:
        out.write(f"\r\n--{boundary}--".encode() + epilogue)
    return out.getvalue()


def reader(pieces: list[bytes]):
    """A ``read(n)`` that hands out the pieces one per call (fewer bytes than asked is allowed)."""
    it = iter(pieces)

    def read(n: int) -> bytes:
        return next(it, b"")
    return read


def parts_of(body: bytes, boundary: str = "b0und", split: list[int] | None = None, **kw) -> list[tuple]:
    cuts = [0, *(split or []), len(body)]
    pieces = [body[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    return [(p.index, p.content_type, bytes(p.data)) for p in MultipartReader(reader(pieces), boundary, **kw)]


def instance(study_uid: str | None = None, series_uid: str | None = None, preamble: bool = True,
             size: int = 4) -> Dataset:
    """A small MR image (``size`` × ``size``); encoded with a preamble and DICM (PS3.10) unless
    ``preamble`` is False."""
    ds = Dataset()
    ds.preamble = b"\0" * 128 if preamble else None
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), series_uid or generate_uid()
    ds.Modality, ds.PatientID, ds.StudyDescription, ds.SeriesNumber = "MR", "P1", "stow test", 1
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * (size * size * 2 // 256) if size >= 16 else bytes(size * size * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = MRImageStorage, ds.SOPInstanceUID
    return ds


def encode(ds: Dataset) -> bytes:
    """The PS3.10 bytes of a dataset, as dicomweb-client encodes them (``pydicom.dcmwrite``)."""
    b = io.BytesIO()
    pydicom.dcmwrite(b, ds)
    return b.getvalue()


def dataset_bytes(data: bytes) -> bytes:
    return bytes(data[read_file_meta(data)[1]:])


# ---------------------------------------------------------------------------
# the multipart reader

BODY_PARTS = [b"\x00\x01DICM" * 3, b"-- not a boundary\r\n--b0un\r\n--b0unX", b"", b"\r\n\r\nlast"]


@pytest.mark.parametrize("leading_crlf", [False, True])
def test_reader_finds_every_part_whatever_the_chunk_boundaries(leading_crlf):
    body = multipart(BODY_PARTS, leading_crlf=leading_crlf, epilogue=b"\r\nepilogue --b0und\r\n")
    want = [(i + 1, "application/dicom", p) for i, p in enumerate(BODY_PARTS)]
    assert parts_of(body) == want
    for cut in range(1, len(body)):  # one split at every offset
        assert parts_of(body, split=[cut]) == want, cut
    assert parts_of(body, split=list(range(1, len(body)))) == want  # one byte per read
    for size in (2, 3, 5, 7, 11):
        assert parts_of(body, split=list(range(size, len(body), size))) == want, size


def test_reader_boundary_with_special_characters_preamble_padding_and_headers():
    boundary = "a'b(c)+_,-./:=? d"
    body = (b"This is the preamble, it is dropped.\r\n--" + boundary.encode() + b"  \t\r\n"
            b"Content-Type: Application/DICOM;\r\n transfer-syntax=1.2.840.10008.1.2.1\r\nContent-ID: <1>\r\n\r\n"
            b"one\r\n--" + boundary.encode() + b"\r\n\r\n"  # a part without header fields
            b"two\r\n--" + boundary.encode() + b"--\r\n")
    got = list(MultipartReader(reader([body]), boundary))
    assert [(p.index, p.content_type, bytes(p.data)) for p in got] == [(1, "application/dicom", b"one"),
                                                                        (2, None, b"two")]
    assert got[0].headers["Content-ID"] == "<1>"


@pytest.mark.parametrize("body, error, text", [
    (b"", MultipartError, "empty"),
    (b"no boundary anywhere in here", MultipartError, "no boundary line"),
    (b"--b0und--\r\n", MultipartError, "no part"),
    (b"--b0und junk\r\n\r\nx\r\n--b0und--", MultipartError, "unexpected bytes after the boundary"),
    (multipart([b"one", b"two"], close=False), TruncatedBody, "ends inside part 2"),
    (multipart([b"one", b"two"], close=False) + b"\r\n--b0und", TruncatedBody, "after the boundary that opens part 3"),
    (multipart([b"one" * 30])[:-30], TruncatedBody, "ends inside part 1"),
    (b"--b0und\r\nContent-Type: appl", TruncatedBody, "header fields of part 1"),
])
def test_reader_refuses_malformed_bodies(body, error, text):
    with pytest.raises(error, match=text):
        parts_of(body)


def test_reader_yields_the_complete_parts_before_a_truncation():
    body = multipart([b"first", b"second" * 100])[:-300]
    got = []
    with pytest.raises(TruncatedBody, match="ends inside part 2"):
        for p in MultipartReader(reader([body[i:i + 7] for i in range(0, len(body), 7)]), "b0und"):
            got.append(bytes(p.data))
    assert got == [b"first"]


def test_reader_stops_a_part_over_the_cap():
    reads = []

    def read(n):
        reads.append(n)
        return b"--b0und\r\n\r\n" if len(reads) == 1 else b"x" * 100  # never ends
    with pytest.raises(PartTooLarge, match="part 1 is larger than 1000 bytes"):
        list(MultipartReader(read, "b0und", max_part=1000, chunk=100))
    assert len(reads) < 20
    assert parts_of(multipart([b"y" * 1000]), max_part=1000) == [(1, "application/dicom", b"y" * 1000)]
    with pytest.raises(PartTooLarge):
        parts_of(multipart([b"y" * 1001]), max_part=1000)
    with pytest.raises(MultipartError, match="not a valid multipart boundary"):
        MultipartReader(reader([]), "x" * 201)
    with pytest.raises(MultipartError, match="not a valid multipart boundary"):
        MultipartReader(reader([]), "trailing space ")
    with pytest.raises(MultipartError, match="not a valid multipart boundary"):
        MultipartReader(reader([]), "new\r\nline")
    long = "9276d5fd-e1ed-44b9-a4e2-3de332aa533a-9276d5fd-e1ed-44b9-a4e2-3de332aa533a"  # Orthanc's: 73 characters
    assert parts_of(multipart([b"x"], long), long) == [(1, "application/dicom", b"x")]


# ---------------------------------------------------------------------------
# the request body reader and the routes

def _headers(**h) -> dict:
    return {k.replace("_", "-"): v for k, v in h.items()}


def test_body_reader_chunked_with_extensions_and_trailers():
    raw = b"5;ext=1\r\nhello\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT REQUEST"
    rfile = io.BufferedReader(io.BytesIO(raw))
    body = BodyReader(rfile, _headers(Transfer_Encoding="chunked"))
    assert body.read() == b"hello" + b"z" * 26 and body.complete and body.bytes_read == 31
    assert rfile.read() == b"NEXT REQUEST"  # not a byte of the next request consumed

    body = BodyReader(io.BufferedReader(io.BytesIO(b"5\r\nhel")), _headers(Transfer_Encoding="chunked"))
    assert body.read() == b"hel" and body.truncated and not body.complete
    with pytest.raises(BadBody, match="chunk size"):
        BodyReader(io.BytesIO(b"zz\r\n"), _headers(Transfer_Encoding="chunked")).read()
    with pytest.raises(BadBody, match="no CRLF after a chunk"):
        BodyReader(io.BytesIO(b"2\r\nabXY0\r\n\r\n"), _headers(Transfer_Encoding="chunked")).read()
    with pytest.raises(BadBody) as e:
        BodyReader(io.BytesIO(b""), _headers(Transfer_Encoding="gzip, chunked")).read()
    assert e.value.status == 501


def test_body_reader_content_length():
    body = BodyReader(io.BytesIO(b"abcdefNEXT"), _headers(Content_Length="6"))
    assert body.read(4) == b"abcd" and not body.complete
    assert body.read(100) == b"ef" and body.read(1) == b"" and body.complete
    cut = BodyReader(io.BytesIO(b"abc"), _headers(Content_Length="6"))
    assert cut.read() == b"abc" and cut.truncated and not cut.complete
    with pytest.raises(BadBody, match="not a number"):
        BodyReader(io.BytesIO(b""), _headers(Content_Length="-1")).read()


def test_uid_route_parameters_and_digit_ones_side_by_side():
    api = AdminAPI(lambda: None, "t", host="127.0.0.1", port=0)
    api.route("POST", "/dicom-web/studies/{study:uid}", lambda req: None)

    def match(path):
        return [(r.path, p) for r, p in api._matching(path)]
    assert match("/dicom-web/studies/1.2.840.113619.2.1") == [("/dicom-web/studies/{study:uid}",
                                                               {"study": "1.2.840.113619.2.1"})]
    assert match("/api/jobs/12/rerun") == [("/api/jobs/{id}/rerun", {"id": "12"})]
    assert match("/api/jobs/1.2/rerun") == [] and match("/dicom-web/studies/1.2/x") == []
    assert match("/dicom-web/studies/" + "1." * 40) == []  # longer than a UID
    with pytest.raises(ValueError, match="unknown parameter kind"):
        api.route("GET", "/x/{a:float}", lambda req: None)


# ---------------------------------------------------------------------------
# a real node

def _stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Node:
    def __init__(self, tmp: Path):
        self.tmp, self.var = tmp, tmp / "var"
        self.port, self.http_port = free_port(), free_port()
        self.token = "stow-test-token-0123456789"
        (tmp / "token").write_text(self.token + "\n")
        self.db = f"sqlite:///{self.var / 'cmr-ai.db'}"
        self.log = tmp / "node.log"
        self.url = f"http://127.0.0.1:{self.http_port}/dicom-web"
        cfg = tmp / "config.yaml"
        cfg.write_text(f"""\
node: {{ae_title: CMR_AI, host: 127.0.0.1, port: {self.port}, http_port: {self.http_port},
        http_token_file: "{tmp / 'token'}"}}
storage: {{path: "{self.var / 'dicom'}"}}
database: {{url: "{self.db}"}}
queue: {{broker: embedded}}
models: {{demo: {{path: demo}}}}
destinations: {{}}
rules: []
""")
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "plugin.cli", "serve", "--config", str(cfg),
                                          "--no-worker"], stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        end = time.monotonic() + 60
        while f"admin API on http://127.0.0.1:{self.http_port}" not in self.log.read_text():
            assert self.proc.poll() is None, f"node exited:\n{self.log.read_text()[-4000:]}"
            assert time.monotonic() < end, f"node did not start:\n{self.log.read_text()[-4000:]}"
            time.sleep(0.1)

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def post(self, body: bytes, boundary: str = "b0und", path: str = "/studies", headers=None) -> requests.Response:
        h = {**self.auth, "Content-Type": CT.format(boundary), **(headers or {})}
        return requests.post(self.url + path, data=body, headers=h, timeout=60)

    def indexed(self) -> dict[str, str]:
        """SOP Instance UID -> path, from the instances table."""
        with db.session_scope(self.db) as s:
            return dict(s.execute(select(db.Instance.sop_instance_uid, db.Instance.path)).all())

    def check_stored(self, sent: dict[str, bytes]) -> None:
        """Every instance (SOP Instance UID -> PS3.10 bytes sent) is indexed and on disk with the same data set."""
        indexed = self.indexed()
        for uid, data in sent.items():
            assert uid in indexed, uid
            stored = Path(indexed[uid]).read_bytes()
            assert Path(indexed[uid]).is_relative_to(self.var / "dicom")
            assert dataset_bytes(stored) == dataset_bytes(data), uid


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("stow-node"))
    yield n
    _stop(n.proc)
    print(n.log.read_text()[-6000:])


def _response(r: requests.Response) -> Dataset:
    assert r.headers["Content-Type"] == "application/dicom+json", r.text
    return Dataset.from_json(r.json())


def _failed(ds: Dataset) -> list[tuple[str, int]]:
    return [(str(i.get("ReferencedSOPInstanceUID", "") or ""), int(i.FailureReason))
            for i in ds.get("FailedSOPSequence", None) or []]


def _referenced(ds: Dataset) -> list[str]:
    return [str(i.ReferencedSOPInstanceUID) for i in ds.get("ReferencedSOPSequence", None) or []]


@pytest.mark.parametrize("style", ["siemens", "philips"])
def test_dicomweb_client_pushes_a_study(node, tmp_path, style):
    from dicomweb_client import DICOMwebClient

    write_study(tmp_path / style, style=style, seed=11 if style == "siemens" else 12, slices=6, phases=10, size=96)
    files = sorted(p for p in (tmp_path / style).rglob("*.dcm"))
    datasets = [pydicom.dcmread(p) for p in files]
    if style == "philips":  # one enhanced multi-frame object per series
        assert any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets)
    else:
        assert len(datasets) > 50
    sent = {str(ds.SOPInstanceUID): encode(ds) for ds in datasets}
    assert sum(map(len, sent.values())) > 10**6  # dicomweb-client sends it chunked
    client = DICOMwebClient(url=node.url, headers=node.auth)
    client.set_http_retry_params(retry=False)
    response = client.store_instances(datasets)
    outcomes = parse_response(response, list(sent), http_status=200)
    assert [o.ok and not o.warning for o in outcomes] == [True] * len(sent), [o.status for o in outcomes]
    node.check_stored(sent)
    # sent again: identical duplicates are plain successes
    again = client.store_instances(datasets[:3])
    assert _referenced(again) == [str(ds.SOPInstanceUID) for ds in datasets[:3]] and "FailedSOPSequence" not in again
    assert "STOW-RS from 127.0.0.1: %d stored, 0 failed" % len(sent) in node.log.read_text()


def test_dicomweb_client_in_memory_datasets_without_preamble(node):
    """pydicom writes a data set built in memory without preamble and DICM, and dicomweb-client
    sends it so: the File Meta at byte 0 is read all the same."""
    from dicomweb_client import DICOMwebClient

    dss = [instance(preamble=False) for _ in range(2)]
    sent = {str(ds.SOPInstanceUID): encode(ds) for ds in dss}
    assert all(not data.startswith(bytes(128)) for data in sent.values())
    response = DICOMwebClient(url=node.url, headers=node.auth).store_instances(dss)
    assert _referenced(response) == list(sent) and "FailedSOPSequence" not in response
    node.check_stored(sent)


def _curl(node: Node, body_file: Path, out: Path, *extra: str, boundary: str = '"b0und"',
          path: str = "/studies") -> tuple[int, dict]:
    assert Path(CURL).exists(), f"{CURL} missing: install the Debian package curl"
    r = subprocess.run([CURL, "-sS", "-X", "POST", "-H", f"Authorization: Bearer {node.token}",
                        "-H", f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}',
                        *extra, "--data-binary", f"@{body_file}", "-o", str(out), "-w", "%{http_code}",
                        node.url + path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout), json.loads(out.read_bytes() or b"null")


@pytest.mark.parametrize("chunked", [False, True])
def test_curl_pushes_a_hand_made_body(node, tmp_path, chunked):
    study = generate_uid()
    dss = [instance(study), instance(study, size=1024), instance(study)]  # 2 MiB: curl asks Expect: 100-continue
    sent = {str(ds.SOPInstanceUID): encode(ds) for ds in dss}
    body = tmp_path / "body"
    # an unquoted boundary this time when chunked, a preamble and an epilogue
    body.write_bytes(multipart(list(sent.values()), "cmr-ai.test.boundary", preamble=b"preamble\r\n",
                               epilogue=b"\r\nepilogue\r\n"))
    extra = ("-H", "Transfer-Encoding: chunked") if chunked else ()
    status, doc = _curl(node, body, tmp_path / "out.json", *extra,
                        boundary="cmr-ai.test.boundary" if chunked else '"cmr-ai.test.boundary"',
                        path=f"/studies/{study}")
    assert status == 200, doc
    ds = Dataset.from_json(doc)
    assert _referenced(ds) == list(sent) and "FailedSOPSequence" not in ds
    assert [str(i.ReferencedSOPClassUID) for i in ds.ReferencedSOPSequence] == [MRImageStorage] * 3
    assert "RetrieveURL" not in ds
    node.check_stored(sent)


def test_mixed_request_stores_the_good_and_lists_the_bad(node):
    good = [encode(instance()) for _ in range(2)]
    cut = instance()
    cut_bytes = encode(cut)
    cut_bytes = cut_bytes[:len(cut_bytes) - 20]  # the data set cut inside its pixel data
    parts = [good[0], cut_bytes, ("text/plain", b"hello, not DICOM"), b"not a DICOM file at all", good[1]]
    r = node.post(multipart(parts))
    assert r.status_code == 202, r.text
    ds = _response(r)
    good_uids = [read_uid(g) for g in good]
    assert _referenced(ds) == good_uids
    assert _failed(ds) == [(str(cut.SOPInstanceUID), 0xC210), ("", 0xC210), ("", 0xC210)]
    assert "Content-Type text/plain, not application/dicom" in r.headers["Warning"]
    assert f"part 2 ({cut.SOPInstanceUID}): 0xC210" in r.headers["Warning"]
    node.check_stored(dict(zip(good_uids, good)))
    assert str(cut.SOPInstanceUID) not in node.indexed()
    # the node still answers
    assert requests.get(f"http://127.0.0.1:{node.http_port}/health", timeout=10).json()["ok"]


def read_uid(data: bytes) -> str:
    return read_file_meta(data)[0][0x00020003].decode().rstrip("\x00 ")


def test_all_parts_refused_is_409_and_other_studies_fail_on_a_study_url(node):
    r = node.post(multipart([b"garbage", ("application/octet-stream", b"x")]))
    assert r.status_code == 409
    assert _failed(_response(r)) == [("", 0xC210), ("", 0xC210)]

    study = generate_uid()
    mine, other = instance(study), instance()
    r = node.post(multipart([encode(mine), encode(other)]), path=f"/studies/{study}")
    assert r.status_code == 202, r.text
    ds = _response(r)
    assert _referenced(ds) == [str(mine.SOPInstanceUID)]
    assert _failed(ds) == [(str(other.SOPInstanceUID), 0xA900)]
    assert f"StudyInstanceUID {other.StudyInstanceUID} in the dataset differs from the study {study}" \
        in r.headers["Warning"]
    assert str(other.SOPInstanceUID) not in node.indexed()
    # only that one: 409
    r = node.post(multipart([encode(instance())]), path=f"/studies/{study}")
    assert r.status_code == 409 and _failed(_response(r))[0][1] == 0xA900
    assert node.post(multipart([encode(instance())]), path="/studies/1..2").status_code == 400


def test_refused_requests(node):
    body = multipart([encode(instance())])
    r = requests.post(node.url + "/studies", data=body, headers={"Content-Type": CT.format("b0und")}, timeout=30)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    r = node.post(body, headers={"Content-Type": 'multipart/related; type="application/dicom+json"; boundary=b0und'})
    assert r.status_code == 415
    assert 'accepts multipart/related; type="application/dicom"' in r.json()["error"]
    assert node.post(body, headers={"Content-Type": "application/dicom"}).status_code == 415
    r = node.post(body, headers={"Content-Type": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 400 and "no boundary parameter" in r.json()["error"]
    r = node.post(b"--other\r\n\r\nx\r\n--other--")
    assert r.status_code == 400 and "no boundary line" in r.json()["error"]


def test_expect_100_continue_without_the_token_hears_401_before_sending_the_body(node):
    """A client that asks before sending a big body (curl, dicomweb-client's large posts) is refused
    at its headers: it never sends the body, and the node never reads it."""
    import socket

    with socket.create_connection(("127.0.0.1", node.http_port), timeout=10) as sock:
        sock.sendall((f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Length: {500 * 2**20}\r\n"
                      f"Content-Type: {CT.format('b0und')}\r\nExpect: 100-continue\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
    head = answer.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 401"), head
    assert "100 Continue" not in head and "Connection: close" in head
    # with the token the same request is invited to send its body
    with socket.create_connection(("127.0.0.1", node.http_port), timeout=10) as sock:
        sock.sendall((f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                      f"Authorization: Bearer {node.token}\r\n"
                      f"Content-Type: {CT.format('b0und')}\r\nExpect: 100-continue\r\n\r\n").encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue")


def test_a_body_cut_mid_part_is_400_and_the_complete_parts_are_stored(node):
    first, second = encode(instance()), encode(instance())
    body = multipart([first, second])
    r = node.post(body[:len(body) - len(second) // 2])
    assert r.status_code == 400
    ds = _response(r)
    assert _referenced(ds) == [read_uid(first)] and "FailedSOPSequence" not in ds
    assert "ends inside part 2" in r.headers["Warning"]
    node.check_stored({read_uid(first): first})
    assert read_uid(second) not in node.indexed()
    # cut before any part was complete: the JSON error
    r = node.post(body[:200])
    assert r.status_code == 400 and "ends inside part 1" in r.json()["error"]


def test_a_part_over_the_cap_is_413_and_the_parts_before_it_are_stored(tmp_path):
    """In process, with a small cap (the node's is 2 GiB): the request stops at the large part."""
    from plugin.dicomweb.receiver import StowReceiver
    from plugin.ingest import Indexer
    from plugin.storage import InstanceStore

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    api = AdminAPI(lambda: None, "tok", host="127.0.0.1", port=0)
    api.route("POST", "/dicom-web/studies", StowReceiver(InstanceStore(tmp_path / "dicom"), Indexer(url),
                                                         max_part=100_000))
    api.start()
    try:
        small, big = encode(instance()), encode(instance(size=512))  # 512 KiB of pixels
        with requests.Session() as http:
            r = http.post(f"http://127.0.0.1:{api.port}/dicom-web/studies", data=multipart([small, big, small]),
                          headers={"Authorization": "Bearer tok", "Content-Type": CT.format("b0und")}, timeout=30)
            assert r.status_code == 413
            assert _referenced(_response(r)) == [read_uid(small)]
            assert "part 2 is larger than 100000 bytes" in r.headers["Warning"]
            # the rest of the body was read and dropped: the connection carries the next request
            r = http.post(f"http://127.0.0.1:{api.port}/dicom-web/studies", data=multipart([small]),
                          headers={"Authorization": "Bearer tok", "Content-Type": CT.format("b0und")}, timeout=30)
            assert r.status_code == 200
    finally:
        api.stop()
    with db.session_scope(url) as s:
        assert s.scalars(select(db.Instance.sop_instance_uid)).all() == [read_uid(small)]


def test_orthanc_pushes_a_study_to_the_node(node, make_orthanc, tmp_path):
    orthanc = make_orthanc(config={"DicomWeb": {
        "Enable": True, "Root": "/dicom-web/",
        "Servers": {"cmr": {"Url": node.url + "/", "HttpHeaders": node.auth}}}})
    write_study(tmp_path / "s", style="ge", seed=21, slices=3, phases=4, size=64)
    files = sorted((tmp_path / "s").rglob("*.dcm"))
    http = requests.Session()
    http.trust_env = False
    for p in files:
        r = http.post(orthanc.base + "/instances", data=p.read_bytes(), timeout=30)
        assert r.status_code == 200, r.text
    (study_id,) = orthanc.studies()
    r = http.post(orthanc.base + "/dicom-web/servers/cmr/stow", json={"Resources": [study_id]}, timeout=120)
    assert r.status_code == 200, (r.text, orthanc.log_tail())
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.read_bytes() for p in files}
    node.check_stored(sent)
