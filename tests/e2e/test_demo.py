"""`optrack demo` (what `make demo` runs): it ends on its own and prints the dashboard's address;
with --serve the dashboard stays up, live, until Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.support.processes import base_env

pytestmark = pytest.mark.slow
LINK = re.compile(r"dashboard: (http://127\.0\.0\.1:\d+)/#token=(\S+)")


def test_plain_demo_ends_by_itself_and_prints_the_dashboard(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--port", "0"],
        cwd=tmp_path,
        env=base_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert LINK.search(result.stdout), result.stdout
    assert "API requests:" in result.stdout and "stays up" not in result.stdout


def test_demo_serve_keeps_the_dashboard_up_until_ctrl_c(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "demo", "--serve", "--port", "0"],
        cwd=tmp_path,
        env=base_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "the dashboard stays up at" in line:
                break
        text = "".join(lines)
        match = LINK.search(text)
        assert match and "the dashboard stays up at" in text, text
        base, token = match.groups()
        auth = {"Authorization": f"Bearer {token}"}
        report = requests.get(f"{base}/api/v1/report", headers=auth, timeout=10).json()
        assert report["operations"]["total"] == 3
        assert report["operations"]["by_status"]["COMPLETED"] == 2
        assert requests.get(f"{base}/", timeout=10).status_code == 200
        time.sleep(1)  # still up after the demo's end
        assert requests.get(f"{base}/api/v1/account", headers=auth, timeout=10).ok
        process.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = process.communicate(timeout=40)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and "stopped" in rest
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/", timeout=5)
