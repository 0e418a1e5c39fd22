"""Durable instance store: temp file, fsync, rename, fsync the directory.

Paths are built from UIDs, and only after the UIDs are checked against the UID
syntax of PS3.5 §9.1 (digits and dots, no leading zeros, at most 64 characters),
so a hostile or broken UID can never escape the store.
"""
from __future__ import annotations

import os
import re
import struct
import tempfile
from pathlib import Path

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class BadUID(ValueError):
    """A UID that does not follow PS3.5 §9.1; the message names the attribute."""


def check_uid(value: object, keyword: str) -> str:
    """Return the UID if its syntax is valid, else raise BadUID naming the attribute."""
    uid = str(value or "").strip().rstrip("\x00")
    if not uid:
        raise BadUID(f"{keyword} is missing or empty")
    if len(uid) > 64 or not UID_RE.match(uid):
        raise BadUID(f"{keyword} {uid[:80]!r} is not a valid UID")
    return uid


def _meta_element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element of group 0002 (short-length VRs, and OB)."""
    tag = struct.pack("<HH", group_elem >> 16, group_elem & 0xFFFF)
    if vr == b"OB":
        return tag + b"OB\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _uid_value(uid: str) -> bytes:
    v = uid.encode("ascii")
    return v + b"\x00" if len(v) % 2 else v


def part10_header(sop_class: str, sop_uid: str, transfer_syntax: str, implementation_uid: str,
                  implementation_version: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 §7.1) for a received dataset.

    Byte for byte what pydicom's ``write_file_meta_info`` writes for the same elements
    (pynetdicom's ``Event.encoded_dataset(include_meta=True)``), built by hand: through
    pydicom it cost ~0.4 ms per instance, a twentieth of the node's whole C-STORE.
    """
    version = implementation_version.encode("ascii")
    if len(version) % 2:
        version += b" "
    body = b"".join((
        _meta_element(0x00020001, b"OB", b"\x00\x01"),
        _meta_element(0x00020002, b"UI", _uid_value(sop_class)),
        _meta_element(0x00020003, b"UI", _uid_value(sop_uid)),
        _meta_element(0x00020010, b"UI", _uid_value(transfer_syntax)),
        _meta_element(0x00020012, b"UI", _uid_value(implementation_uid)),
        _meta_element(0x00020013, b"SH", version),
    ))
    return b"\x00" * 128 + b"DICM" + _meta_element(0x00020000, b"UL", struct.pack("<I", len(body))) + body


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | memoryview, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    The bytes go to a temp file in the same directory, which is fsynced and renamed
    over ``path``; then the directory is fsynced so the rename itself is durable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".incoming-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        fsync_dir(path.parent)


class InstanceStore:
    """``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``."""

    def __init__(self, root: str | Path, *, fsync: bool = True, duplicates: str = "replace"):
        if duplicates not in ("replace", "keep"):
            raise ValueError(f"duplicates must be 'replace' or 'keep', not {duplicates!r}")
        self.root = Path(root)
        self.fsync = fsync
        self.duplicates = duplicates
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        study_uid = check_uid(study_uid, "(0020,000D) StudyInstanceUID")
        series_uid = check_uid(series_uid, "(0020,000E) SeriesInstanceUID")
        sop_uid = check_uid(sop_uid, "(0008,0018) SOPInstanceUID")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes | memoryview) -> Path:
        return self.store_instance(study_uid, series_uid, sop_uid, data)[0]

    def store_instance(self, study_uid: str, series_uid: str, sop_uid: str,
                       data: bytes | memoryview) -> tuple[Path, str]:
        """Store durably; returns the path and what happened: ``new``, ``identical`` (the
        same bytes are already stored: nothing written), ``replaced`` or ``kept`` (a
        different copy was already stored; the ``duplicates`` policy decided)."""
        path = self.path_for(study_uid, series_uid, sop_uid)
        outcome = "new"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = None
        if size is not None:
            if size == len(data) and path.read_bytes() == bytes(data):
                return path, "identical"
            if self.duplicates == "keep":
                return path, "kept"
            outcome = "replaced"
        new_dirs = not path.parent.exists()
        write_atomic(path, data, fsync=self.fsync)
        if new_dirs and self.fsync:  # make the new directory entries durable too
            fsync_dir(path.parent.parent)
            fsync_dir(self.root)
        return path, outcome

    def cleanup_temp(self) -> int:
        """Remove temp files left by a crash mid-write (never acknowledged). Returns the count."""
        n = 0
        for p in self.root.rglob(".incoming-*.tmp"):
            try:
                p.unlink()
                n += 1
            except FileNotFoundError:
                pass
        return n
