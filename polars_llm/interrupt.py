"""Ctrl-C that reaches a caller whose thread Polars holds.

Polars runs an expression's Python function on its own pool threads while the main thread
waits inside Polars' native code, where Python's SIGINT handler cannot run until the whole
``with_columns`` returns: in library mode Ctrl-C would wait for the batch to finish. So, when an
``.llm`` expression is built on the main thread, polars-llm asks Python to also write each
signal's number to a socket (``signal.set_wakeup_fd``; only when nothing else uses that hook) and
a small thread counts the SIGINTs it reads there. A batch that waits on a pool thread for work
of an expression built on the main thread then stops within a fraction of a second and raises
``KeyboardInterrupt``, which Polars hands to the main thread. Work of other threads goes on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading

_lock = threading.Lock()
_generation = 0
_sockets: tuple[socket.socket, socket.socket] | None = None


def generation() -> int:
    """How many SIGINTs have been seen since the hook was installed."""
    return _generation


def install() -> None:
    """Install the hook, from the main thread; does nothing elsewhere or if the hook is taken."""
    global _sockets
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        if _sockets is None:
            reader, writer = socket.socketpair()
            reader.setblocking(True)
            writer.setblocking(False)
            threading.Thread(
                target=_count, args=(reader,), name="polars-llm-sigint", daemon=True
            ).start()
            _sockets = (reader, writer)
        fd = _sockets[1].fileno()
        try:
            previous = signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
        except ValueError:  # not the main thread of the main interpreter
            return
        if previous not in (-1, fd):
            # Someone else (an asyncio loop on this thread, say) owns the hook: give it back.
            signal.set_wakeup_fd(previous)


def _count(reader: socket.socket) -> None:
    global _generation
    while True:
        try:
            data = reader.recv(64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGINT in data:
            _generation += 1


def _reset_in_child() -> None:
    # A forked child has the parent's sockets but not its reader thread.
    global _sockets, _lock
    ours = _sockets[1].fileno() if _sockets is not None else None
    if _sockets is not None:
        for s in _sockets:
            with contextlib.suppress(OSError):
                s.close()
    _sockets = None
    _lock = threading.Lock()
    with contextlib.suppress(ValueError):
        previous = signal.set_wakeup_fd(-1)
        if previous != ours:
            signal.set_wakeup_fd(previous)


os.register_at_fork(after_in_child=_reset_in_child)
