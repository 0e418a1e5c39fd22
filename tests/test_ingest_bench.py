"""bench/ingest_bench.py runs end to end on a tiny study: real Orthanc (Nagle's algorithm off,
and on), the bare pynetdicom SCP and ``cmr-ai serve`` each get every instance from dcmtk's
storescu, one sender and two at once, and the ratio lines are printed. No timing is
asserted: this machine's speed is not the bench's subject here, its plumbing is.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ingest_bench_sends_a_small_study_to_the_three_receivers_and_prints_the_ratios(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "ingest_bench.py"), "--instances", "20",
                        "--senders", "2", "--workdir", str(tmp_path / "bench")],
                       cwd=ROOT, capture_output=True, text=True, timeout=540,
                       env=dict(os.environ, COLUMNS="200", HF_HUB_OFFLINE="1"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    for peer in ("orthanc", "orthanc with Nagle on", "bare pynetdicom SCP"):
        for senders in ("1 sender", "2 senders"):
            assert re.search(rf"^cmr-ai vs {peer}: \d+\.\d+x instances/s, {senders} ", out, re.M), out[-6000:]
    assert re.search(r"^cmr-ai serve memory: node process \d+ MB", out, re.M), out[-6000:]
    assert "LOST" not in out
    assert len(re.findall(r"\b20/20\b", out)) == 8, out[-6000:]  # 4 receivers x (1 and 2 senders), all arrived
