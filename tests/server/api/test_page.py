"""The web page renders in a real headless Chromium, with auth on (token from the URL fragment)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.server.api.conftest import GOOD_TOKEN, Running

CHROMIUM = "/usr/bin/chromium"


def chromium() -> str:
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if path is None:
        pytest.fail(
            "Chromium is not installed; run scripts/setup.sh (it installs the `chromium` Debian package) "
            "to run the web page test"
        )
    return path


def dump_dom(url: str, profile: Path) -> str:
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_page_renders_datasets_with_auth(auth_server: Running, tmp_path: Path) -> None:
    dom = dump_dom(f"{auth_server.base_url}/#token={GOOD_TOKEN}", tmp_path / "profile")
    assert 'id="dataset-alpha"' in dom and 'id="dataset-beta"' in dom, dom[-3000:]
    assert "alpha v1" in dom
    assert re.search(r'class="verdict consistent">consistent<', dom)
    bars = re.findall(r'<div class="bar"[^>]*style="height: ([0-9.e-]+)%;"', dom)
    assert len(bars) >= 4 and max(float(b) for b in bars) == 100.0, dom[-3000:]
    assert "sha256:aaaaaaaa" in dom  # the teacher fingerprint
    assert "2 dataset(s)" in dom
    assert GOOD_TOKEN not in dom  # not echoed into the page


@pytest.mark.slow
def test_page_without_token_says_why(auth_server: Running, tmp_path: Path) -> None:
    dom = dump_dom(f"{auth_server.base_url}/", tmp_path / "profile")
    assert "could not load: 401" in dom
    assert 'class="bar"' not in dom


def test_page_is_static_and_self_contained(auth_server: Running) -> None:
    with httpx.Client(base_url=auth_server.base_url) as c:  # no token: the shell holds no data
        r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert not re.search(r'(src|href)="(https?:)?//', r.text), "no external assets"
    assert "alpha" not in r.text
