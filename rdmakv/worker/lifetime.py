"""Stores still open when the interpreter exits.

Scripts written for MXNet or BytePS never close their store: one still open
when the interpreter exits is closed then (as Horovod and BytePS shut down at
exit), unless an unhandled exception ends the program, which fails the job."""
from __future__ import annotations

import atexit
import sys
import weakref

_open_stores = weakref.WeakSet()
_exit_hooks_installed = False
_unhandled_exit = None          # the exception that ended the main thread, if one did


def register(store):
    """store is open: close it at exit (store.close_at_exit()) unless it is closed before."""
    _install_exit_hooks()
    _open_stores.add(store)


def unregister(store):
    _open_stores.discard(store)


def unhandled_exit():
    """The exception that ended the main thread, or None."""
    return _unhandled_exit


def _install_exit_hooks():
    """Once per process, at the first KVStore: atexit hooks run last-registered
    first, so a framework imported before the store (MXNet) shuts down after it."""
    global _exit_hooks_installed
    if _exit_hooks_installed:
        return
    _exit_hooks_installed = True
    previous = sys.excepthook

    def remember_unhandled(kind, value, traceback):
        global _unhandled_exit
        _unhandled_exit = value
        previous(kind, value, traceback)

    sys.excepthook = remember_unhandled
    atexit.register(close_open_stores)


def close_open_stores():
    for store in list(_open_stores):
        store.close_at_exit()
