"""The dashboard page (``GET /``) of a real node, in Debian's headless Chromium driven by Playwright.

The node (tests/adminnode.py) ran one phantom study through the demo model into a real
Orthanc. The page must show that study, its DONE job and the rules version in force;
its re-send button must queue an export again (and the node's outbox deliver it
again), its re-run button run the job again. The screenshot is kept as ``var/test-artifacts/dashboard.png``. A missing
Chromium or Playwright fails the test: the browser is Debian's, never downloaded.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from peers import PeerMissing

pytest_plugins = ["adminnode"]

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "var" / "test-artifacts" / "dashboard.png"


def _browser_parts():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Python Playwright missing: it is in the dev extra", pytrace=False)
    from viewer import CHROMIUM_ARGS, chromium_path

    try:
        return sync_playwright, chromium_path(), list(CHROMIUM_ARGS)
    except PeerMissing as e:
        pytest.fail(str(e), pytrace=False)


def _export(node, eid: int) -> dict:
    return next(e for e in node.get("/api/exports").json()["items"] if e["id"] == eid)


def test_dashboard_shows_the_study_and_re_sends_an_export(admin_node):
    node = admin_node
    sync_playwright, executable, args = _browser_parts()
    rules_version = node.get("/health", token=None).json()["rules_version"]
    assert rules_version
    exports = [e for e in node.get("/api/exports").json()["items"] if e["job_id"] == node.job_id]
    assert exports and all(e["state"] == "sent" for e in exports), exports
    target = exports[0]

    # the page itself is open, but it holds no data: everything comes from the API with the token
    page_resp = node.get("/", token=None)
    assert page_resp.status_code == 200 and "default-src 'none'" in page_resp.headers["Content-Security-Policy"]
    assert node.study_uid not in page_resp.text

    problems: list[str] = []
    t0 = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=args, headless=True, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))

            # without a token: the login form; a wrong one is refused
            page.goto(node.base + "/", wait_until="load")
            page.wait_for_selector("#login:not([hidden])")
            page.fill("#token", "not-the-token")
            page.click("#login button[type=submit]")
            page.wait_for_selector("#login-error:has-text('refused')")
            problems.clear()  # the 401 it just provoked is logged by Chromium as a console error

            # with the token from the URL (a new tab): taken once, then gone from the address bar
            page.close()
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
            page.goto(f"{node.base}/#token={node.token}", wait_until="load")
            page.wait_for_selector(f'#jobs tr[data-job-id="{node.job_id}"][data-state="done"]', timeout=20_000)
            assert node.token not in page.url
            study_row = page.locator(f'#studies tr[data-study-uid="{node.study_uid}"]')
            assert study_row.count() == 1
            text = study_row.inner_text()
            assert "complete" in text and f"#{node.job_id}" in text and "done" in text and "cardiac-mr" in text, text
            assert str(len(node.sent)) in text.split()
            assert page.inner_text("#rules-version") == rules_version
            job_row = page.locator(f'#jobs tr[data-job-id="{node.job_id}"]')
            assert job_row.locator(".rules-version").inner_text() == rules_version
            assert job_row.locator("button.rerun").count() == 1  # a done analysis job can be run again
            assert page.locator("#failures tbody tr").count() == 0 and page.is_visible("#failures-empty")
            for e in exports:
                row = page.locator(f'#exports tr[data-export-id="{e["id"]}"]')
                assert row.get_attribute("data-state") == "sent" and "pacs" in row.inner_text()

            # re-send one export: queued again, then delivered again by the node's outbox
            page.click(f'#exports tr[data-export-id="{target["id"]}"] button.resend')
            page.wait_for_selector(f"#message.ok:has-text('export {target['id']} queued again')")
            end = time.monotonic() + 30
            while (now := _export(node, target["id"]))["sent_at"] == target["sent_at"] or now["state"] != "sent":
                assert time.monotonic() < end, f"export {target['id']} not re-sent: {now}\n{node.log_tail()}"
                time.sleep(0.3)
            assert now["attempts"] >= 1 and now["sent_at"] > target["sent_at"]
            # the job went back to EXPORTING for the re-send and is DONE again: the page shows it
            page.wait_for_selector(f'#exports tr[data-export-id="{target["id"]}"][data-state="sent"]')
            page.wait_for_selector(f'#jobs tr[data-job-id="{node.job_id}"][data-state="done"]', timeout=20_000)

            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # re-run the job (after the browser's confirmation): a new chain, the model runs again
            before = next(j for j in node.get("/api/jobs").json()["items"] if j["id"] == node.job_id)
            page.once("dialog", lambda d: d.accept())
            page.click(f'#jobs tr[data-job-id="{node.job_id}"] button.rerun')
            page.wait_for_selector(f"#message.ok:has-text('job {node.job_id} queued again')")
            end = time.monotonic() + 120
            while (job := next(j for j in node.get("/api/jobs").json()["items"] if j["id"] == node.job_id))[
                    "state"] != "done" or job["attempts"] != before["attempts"] + 1:
                assert job["state"] != "failed" and time.monotonic() < end, f"{job}\n{node.log_tail()}"
                time.sleep(0.5)
            assert job["started_at"] > before["finished_at"] and job["created_at"] == before["created_at"]
            page.wait_for_selector(f'#jobs tr[data-job-id="{node.job_id}"][data-state="done"]', timeout=20_000)
        finally:
            browser.close()
    print(f"dashboard screenshot: {SCREENSHOT} (browser part {time.monotonic() - t0:.1f} s)")
    assert not problems, problems
    assert SCREENSHOT.stat().st_size > 10_000
