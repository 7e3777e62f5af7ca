"""Start ``vllm-elastic serve`` as a user would (a subprocess on a free local port) and
stop it: shared by the server tests of every family."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(model: Path, args: list[str], log: Path) -> Iterator[str]:
    """``vllm-elastic serve model *args`` on 127.0.0.1 (engine in its own process, as
    ``vllm serve`` runs it), logging to ``log``; yields the base URL once /health answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm_elastic.cli", "serve", str(model),
           "--host", "127.0.0.1", "--port", str(port), *args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
            if time.time() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def request_body(
    extra: dict[str, Any] | None, think: int | None = None, **kw: Any
) -> dict[str, Any]:
    """``extra_body`` of a greedy test request: token ids returned, EOS ignored,
    ``vllm_xargs`` and vLLM's ``thinking_token_budget`` where given, plus ``kw``."""
    body: dict[str, Any] = {"ignore_eos": True, "return_token_ids": True, **kw}
    if extra is not None:
        body["vllm_xargs"] = extra
    if think is not None:
        body["thinking_token_budget"] = think
    return body


def metric(server: str, name: str, **labels: str) -> float:
    """Value of the ``/metrics`` sample ``name`` with exactly ``labels`` (0 if absent)."""
    text = requests.get(f"{server}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{"):
            got = ",".join(sorted(line[line.index("{") + 1 : line.index("}")].split(",")))
            if got == want:
                return float(line.split()[-1])
    return 0.0
