"""Ctrl-C during :func:`~vi_flows.fit`: finish the current step, write the checkpoint, then re-raise."""

from __future__ import annotations

import signal
import threading


class _DeferredInterrupt:
    """Turn the first Ctrl-C into a flag read between steps, so the fit stops where its state can be saved.

    A step interrupted half-way would leave gradients, optimizer state and random
    streams out of step with each other, and the checkpoint could not reproduce the
    run. Only in the main thread and over Python's default handler (a user's own
    handler is left alone); the first signal restores that handler, so a second
    Ctrl-C interrupts at once.
    """

    def __init__(self):
        self.requested = False
        self._installed = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
