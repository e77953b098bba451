"""rdmakv.mxnet.engine against MXNet's real threaded engine."""
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")
from rdmakv.mxnet import engine as eng  # noqa: E402

pytestmark = [pytest.mark.mxnet, pytest.mark.timeout(60)]


def later(delay, fn, *args):
    """Run fn(*args) after `delay` seconds on a new thread (a stand-in for the
    transport thread)."""
    t = threading.Thread(target=lambda: (time.sleep(delay), fn(*args)), daemon=True)
    t.start()
    return t


def doubler(src, dst, delay=0.2, seen=None):
    def fn(done):
        s, d = eng.numpy_view(src), eng.numpy_view(dst)
        if seen is not None:
            seen.append(threading.get_ident())

        def work():
            d[...] = s * 2
            done()
        later(delay, work)
    return fn


def test_push_returns_at_once_and_readers_wait_for_done():
    a = mx.nd.arange(6).reshape((2, 3))
    out = mx.nd.zeros((2, 3))
    seen = []
    start = time.monotonic()
    eng.push_async(doubler(a, out, 0.3, seen), const=[a], mutable=[out])
    after = out + 1                   # the next operator depends on out
    assert time.monotonic() - start < 0.1
    np.testing.assert_array_equal(after.asnumpy(), np.arange(6).reshape(2, 3) * 2 + 1)
    assert time.monotonic() - start >= 0.25
    assert seen and seen[0] != threading.get_ident()   # ran on an engine thread


def test_earlier_writers_run_before_and_later_writers_after():
    a = mx.nd.ones((4,))
    a *= 3                                     # pending write: fn must see 3s
    out = mx.nd.zeros((4,))
    eng.push_async(doubler(a, out, 0.2), const=[a], mutable=[out])
    a[:] = 100                                 # must wait until done() (read dep)
    np.testing.assert_array_equal(out.asnumpy(), [6] * 4)
    np.testing.assert_array_equal(a.asnumpy(), [100] * 4)


def test_in_place_write_dependency():
    a = mx.nd.arange(4)
    eng.push_async(doubler(a, a, 0.1), mutable=[a])
    eng.push_async(doubler(a, a, 0.1), mutable=[a])
    np.testing.assert_array_equal(a.asnumpy(), np.arange(4) * 4)


def test_failure_raised_when_output_is_read_then_cleared():
    out = mx.nd.zeros((3,))
    eng.push_async(lambda done: later(0.1, done, RuntimeError("link down")), mutable=[out])
    with pytest.raises(mx.base.MXNetError, match="RuntimeError: link down"):
        out.asnumpy()
    out[:] = 1                     # the array is usable afterwards
    np.testing.assert_array_equal(out.asnumpy(), [1, 1, 1])
    mx.nd.waitall()


def test_exception_from_fn_itself_surfaces():
    out = mx.nd.zeros((2,))

    def fn(done):
        raise KeyError("no such key")
    eng.push_async(fn, mutable=[out])
    with pytest.raises(mx.base.MXNetError, match="KeyError"):
        out.wait_to_read()
    mx.nd.waitall()


def test_done_twice_is_an_error():
    out = mx.nd.zeros((2,))
    errors = []

    def fn(done):
        def twice():
            done()
            try:
                done()
            except RuntimeError as exc:
                errors.append(exc)
        later(0.05, twice)
    eng.push_async(fn, mutable=[out])
    out.wait_to_read()
    time.sleep(0.1)
    assert errors and "completed twice" in str(errors[0])


def test_nothing_leaks():
    gc.collect()
    base = eng.pending_count()
    refs = []
    outs = []
    for i in range(50):
        out = mx.nd.zeros((8,))

        def fn(done, i=i):
            later(0.001, done)
        refs.append(weakref.ref(fn))
        eng.push_async(fn, mutable=[out], priority=i)
        outs.append(out)
        del fn
    mx.nd.waitall()
    time.sleep(0.1)
    gc.collect()
    assert eng.pending_count() == base
    assert all(r() is None for r in refs)


def test_native_done_operators_are_forgotten_once_run():
    # native_done: the operator has no deleter (the thread completing it must not need
    # the GIL for one), so the module forgets fn as soon as the engine runs it.
    base = eng.pending_count()
    started = threading.Event()
    release = threading.Event()
    out = mx.nd.zeros((4,))

    def fn(done):
        d = eng.numpy_view(out)
        started.set()

        def work():
            release.wait(10)
            d[:] = 3
            done()
        later(0, work)
    eng.push_async(fn, mutable=[out], native_done=True)
    assert started.wait(10)
    assert eng.pending_count() == base          # forgotten, though not done
    release.set()
    np.testing.assert_array_equal(out.asnumpy(), [3] * 4)


def test_numpy_view_is_zero_copy_and_respects_slices():
    a = mx.nd.arange(10, dtype="float64")
    a.wait_to_read()
    view = eng.numpy_view(a[2:5])
    assert view.dtype == np.float64 and view.shape == (3,)
    np.testing.assert_array_equal(view, [2, 3, 4])
    view[:] = -1
    np.testing.assert_array_equal(a.asnumpy()[:6], [0, 1, -1, -1, -1, 5])


def test_numpy_view_keeps_array_alive():
    a = mx.nd.ones((1000,))
    a.wait_to_read()
    view = eng.numpy_view(a)
    del a
    gc.collect()
    mx.nd.zeros((1000,)).wait_to_read()
    assert view.sum() == 1000


def test_numpy_view_rejects_sparse():
    with pytest.raises(ValueError, match="dense"):
        eng.numpy_view(mx.nd.sparse.zeros("csr", (2, 2)))


def test_naive_engine_completes_synchronously():
    script = textwrap.dedent("""
        import threading, time, numpy as np, mxnet as mx
        from rdmakv.mxnet import engine as eng
        out = mx.nd.zeros((3,))
        def fn(done):
            d = eng.numpy_view(out)
            def work():
                time.sleep(0.1); d[:] = 7; done()
            threading.Thread(target=work).start()
        eng.push_async(fn, mutable=[out])
        assert (out.asnumpy() == 7).all()
        eng.push_async(fn, mutable=[out], native_done=True)
        assert (out.asnumpy() == 7).all()
        try:   # NaiveEngine is synchronous: the push itself raises
            eng.push_async(lambda done: done(ValueError("bad")), mutable=[out])
        except ValueError as exc:
            assert "bad" in str(exc)
        else:
            raise SystemExit("no error")
        out[:] = 1
        assert (out.asnumpy() == 1).all() and eng.pending_count() == 0
        print("ok")
    """)
    env = dict(os.environ, MXNET_ENGINE_TYPE="NaiveEngine")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
