"""``rankwise serve`` as a process: flags checked up front, graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from _serve_helpers import build_llama_dir  # noqa: E402

from rankwise.cli.main import main  # noqa: E402


def test_bad_flags_fail_before_loading(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "--model" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    empty = tmp_path / "token"
    empty.write_text("  \n")
    assert main(["serve", "--model", str(tmp_path / "m"), "--token-file", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests(tmp_path):
    root = build_llama_dir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RANKWISE_TOKEN"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "rankwise.cli.main", "serve", "--model", str(root / "model"),
                             "--adapters", str(root / "adapters"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        body = {"model": "a", "prompt": [2000, 2001], "max_tokens": 100, "temperature": 0, "stream": True}
        chunks = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            chunks.append(next(lines))
            proc.send_signal(signal.SIGTERM)  # mid-stream
            chunks += list(lines)
        assert r.status_code == 200
        data = [c for c in chunks if c.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        last = json.loads(data[-2][len("data: "):])["choices"][0]
        assert last["finish_reason"] in ("length", "stop")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "requests answered" in out
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
