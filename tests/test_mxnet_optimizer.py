"""rdmakv.mxnet.optimizer against real MXNet: descriptions, updates, saved states."""
import copy
import json
import struct

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from rdmakv.mxnet import optimizer as ro  # noqa: E402

pytestmark = pytest.mark.mxnet

# (registered name, constructor kwargs) covering every supported optimizer.
CASES = [
    ("sgd", dict(learning_rate=0.1, momentum=0.9, wd=1e-3, clip_gradient=5.0)),
    ("sgd", dict(learning_rate=0.1)),
    ("ccsgd", dict(learning_rate=0.05, momentum=0.5)),
    ("nag", dict(learning_rate=0.1, momentum=0.9, rescale_grad=0.5)),
    ("signum", dict(learning_rate=0.01, momentum=0.8, wd_lh=0.01)),
    ("ftml", dict(learning_rate=0.01, beta1=0.5, beta2=0.9)),
    ("dcasgd", dict(learning_rate=0.1, lamda=0.1)),
    ("adam", dict(learning_rate=0.01, beta1=0.8, epsilon=1e-6, wd=1e-4)),
    ("adagrad", dict(learning_rate=0.1, eps=1e-6)),
    ("rmsprop", dict(learning_rate=0.01, centered=True, clip_weights=3.0)),
    ("rmsprop", dict(learning_rate=0.01, gamma1=0.8)),
    ("adadelta", dict(rho=0.8, epsilon=1e-4)),
    ("ftrl", dict(learning_rate=0.2, lamda1=0.02, beta=0.5)),
    ("adamax", dict(learning_rate=0.01, beta2=0.99)),
]
IDS = ["%s-%d" % (name, i) for i, (name, _) in enumerate(CASES)]


def schedulers():
    sched = mx.lr_scheduler
    return [
        sched.FactorScheduler(step=3, factor=0.5, base_lr=0.1, warmup_steps=2,
                              warmup_begin_lr=0.01),
        sched.MultiFactorScheduler(step=[2, 5, 7], factor=0.3, base_lr=0.2),
        sched.PolyScheduler(max_update=12, base_lr=0.1, pwr=2, final_lr=0.001,
                            warmup_steps=3, warmup_mode="constant", warmup_begin_lr=0.02),
        sched.CosineScheduler(max_update=10, base_lr=0.1, final_lr=0.01),
    ]


def roundtrip(desc):
    """What a server receives: the description after a trip through JSON."""
    return json.loads(json.dumps(desc, allow_nan=False))


def train(updater, weights, steps, seed):
    """Apply `steps` deterministic updates to every (key, chunk) of `weights`."""
    rng = np.random.RandomState(seed)
    for _ in range(steps):
        for (key, chunk), w in sorted(weights.items()):
            updater.update(key, chunk, w, rng.standard_normal(w.shape).astype(w.dtype))


def make_weights(dtype=np.float32):
    rng = np.random.RandomState(0)
    return {(key, chunk): rng.standard_normal(n).astype(dtype)
            for key, chunk, n in [("0", 0, 7), ("0", 1, 3), ("weight", 0, 5)]}


# -- describe / make_optimizer ---------------------------------------------

@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_describe_roundtrip_rebuilds_same_hyperparameters(name, kwargs):
    opt = mx.optimizer.create(name, **kwargs)
    desc = ro.describe(opt)
    assert desc["name"] == name
    again = ro.make_optimizer(roundtrip(desc))
    assert type(again) is type(opt)
    assert ro.describe(again) == desc


@pytest.mark.parametrize("index", range(4))
def test_scheduler_rebuilt_in_its_current_state(index):
    sched = schedulers()[index]
    for n in range(1, 5):          # advance it: FactorScheduler etc. mutate themselves
        sched(n)
    opt = mx.optimizer.SGD(lr_scheduler=sched)
    again = ro.make_optimizer(roundtrip(ro.describe(opt)))
    assert type(again.lr_scheduler) is type(sched)
    assert [again.lr_scheduler(n) for n in range(5, 15)] == [sched(n) for n in range(5, 15)]


def test_learning_rate_overrides_scheduler_base_lr_like_mxnet():
    sched = mx.lr_scheduler.FactorScheduler(step=2, factor=0.5, base_lr=1.0)
    opt = mx.optimizer.SGD(learning_rate=0.3, lr_scheduler=sched)
    again = ro.make_optimizer(roundtrip(ro.describe(opt)))
    assert again.learning_rate == opt.learning_rate == 0.3


def test_multipliers_resolved_from_gluon_parameters():
    p0 = mx.gluon.Parameter("dense_weight", shape=(2,), lr_mult=2.0, wd_mult=0.0)
    p1 = mx.gluon.Parameter("dense_bias", shape=(2,))
    opt = mx.optimizer.SGD(learning_rate=0.1, wd=0.1, param_dict={0: p0, 1: p1})
    desc = ro.describe(opt)
    assert desc["lr_mult"] == {"#0": 2.0, "#1": 1.0}
    assert desc["wd_mult"] == {"#0": 0.0, "#1": 1.0}
    updater = ro.make_updater(roundtrip(desc))
    w0, w1 = np.ones(2, np.float32), np.ones(2, np.float32)
    updater.update("#0", 0, w0, np.ones(2, np.float32))
    updater.update("#1", 0, w1, np.ones(2, np.float32))
    np.testing.assert_allclose(w0, 1 - 0.2 * 1.0, rtol=1e-6)          # lr 0.2, no wd
    np.testing.assert_allclose(w1, 1 - 0.1 * (1 + 0.1), rtol=1e-6)    # lr 0.1, wd 0.1


def test_multipliers_by_name_and_idx2name():
    opt = mx.optimizer.SGD(learning_rate=1.0, param_idx2name={0: "a_weight", 1: "a_bias"})
    opt.set_lr_mult({"a_weight": 0.5, 3: 4.0})
    desc = ro.describe(opt)
    assert desc["lr_mult"]["#0"] == 0.5 and desc["lr_mult"]["#1"] == 1.0
    assert desc["lr_mult"]["#3"] == 4.0 and desc["lr_mult"]["a_weight"] == 0.5
    assert desc["wd_mult"]["#1"] == 0.0    # MXNet: no weight decay on biases by name


def test_custom_optimizer_class_rejected():
    class MySGD(mx.optimizer.SGD):
        pass
    with pytest.raises(ValueError, match="only MXNet's built-in optimizers"):
        ro.describe(MySGD(learning_rate=0.1))


def test_custom_scheduler_rejected():
    class Halving(mx.lr_scheduler.LRScheduler):
        def __call__(self, num_update):
            return self.base_lr / (1 + num_update)
    with pytest.raises(ValueError, match="built-in"):
        ro.describe(mx.optimizer.SGD(lr_scheduler=Halving()))


@pytest.mark.parametrize("name", ["lamb", "lars", "nadam", "sgld", "lbsgd"])
def test_non_elementwise_builtins_rejected_with_reason(name):
    with pytest.raises(ValueError, match="cannot run optimizer %r on the servers: .+" % name):
        ro.describe(mx.optimizer.create(name))


# -- updates ----------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_chunked_update_equals_mxnet_updater_on_whole_tensor(name, kwargs):
    updater = ro.make_updater(roundtrip(ro.describe(mx.optimizer.create(name, **kwargs))))
    reference = mx.optimizer.get_updater(mx.optimizer.create(name, **kwargs))
    rng = np.random.RandomState(1)
    whole = rng.standard_normal(10).astype(np.float32)
    ref = mx.nd.array(whole)
    chunks = [whole[:6].copy(), whole[6:].copy()]
    for _ in range(4):
        grad = rng.standard_normal(10).astype(np.float32)
        reference(0, mx.nd.array(grad), ref)
        updater.update("0", 0, chunks[0], grad[:6].copy())
        updater.update("0", 1, chunks[1], grad[6:].copy())
    np.testing.assert_allclose(np.concatenate(chunks), ref.asnumpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("with_scheduler", [False, True])
def test_resume_is_bit_identical(name, kwargs, with_scheduler):
    def build():
        kw = dict(kwargs)
        if with_scheduler:
            kw.pop("learning_rate", None)
            kw["lr_scheduler"] = mx.lr_scheduler.MultiFactorScheduler(
                step=[2, 4], factor=0.5, base_lr=0.05, warmup_steps=1, warmup_begin_lr=0.01)
        return ro.describe(mx.optimizer.create(name, **kw))

    straight = ro.make_updater(roundtrip(build()))
    expected = make_weights()
    train(straight, expected, 3, seed=1)
    train(straight, expected, 4, seed=2)

    first = ro.make_updater(roundtrip(build()))
    weights = make_weights()
    train(first, weights, 3, seed=1)
    blob = first.dump_states()
    resumed = ro.make_updater(roundtrip(build()))     # a fresh server
    resumed.load_states(blob)
    assert resumed.dump_states() == blob
    train(resumed, weights, 4, seed=2)
    for slot in expected:
        np.testing.assert_array_equal(weights[slot], expected[slot])
    assert resumed.optimizer.num_update == straight.optimizer.num_update == 7


def test_multi_precision_float16_resume_is_bit_identical():
    desc = ro.describe(mx.optimizer.SGD(learning_rate=0.1, momentum=0.9,
                                        multi_precision=True))
    straight = ro.make_updater(roundtrip(desc))
    expected = make_weights(np.float16)
    train(straight, expected, 5, seed=3)
    first = ro.make_updater(roundtrip(desc))
    weights = make_weights(np.float16)
    train(first, weights, 2, seed=3)
    resumed = ro.make_updater(roundtrip(desc))
    resumed.load_states(first.dump_states())
    rng_state_steps = 3
    # replay the rest of seed 3's stream: regenerate and skip the first 2 steps
    rng = np.random.RandomState(3)
    for step in range(5):
        for slot, w in sorted(weights.items()):
            g = rng.standard_normal(w.shape).astype(w.dtype)
            if step >= 5 - rng_state_steps:
                resumed.update(slot[0], slot[1], w, g)
    for slot in expected:
        np.testing.assert_array_equal(weights[slot], expected[slot])
    state = resumed._states[resumed._index[("0", 0)]]
    assert any(isinstance(s, mx.nd.NDArray) and s.dtype == np.float32 for s in state)


def test_chunk_size_change_is_a_clear_error():
    updater = ro.make_updater(ro.describe(mx.optimizer.Adam()))
    updater.update("k", 0, np.zeros(4, np.float32), np.ones(4, np.float32))
    with pytest.raises(ValueError, match="state was made for 4 float32"):
        updater.update("k", 0, np.zeros(5, np.float32), np.ones(5, np.float32))


# -- hostile descriptions --------------------------------------------------

def _valid():
    return roundtrip(ro.describe(mx.optimizer.SGD(
        learning_rate=0.1, momentum=0.9,
        lr_scheduler=mx.lr_scheduler.MultiFactorScheduler(step=[2, 3], base_lr=0.1))))


def _set(path, value):
    def mutate(d):
        *parents, last = path
        for p in parents:
            d = d[p]
        d[last] = value
    return mutate


def _drop(path):
    def mutate(d):
        *parents, last = path
        for p in parents:
            d = d[p]
        del d[last]
    return mutate


HOSTILE = [
    (_set(["format"], "pickle"), "format must be"),
    (_set(["name"], "os.system"), "unknown optimizer"),
    (_set(["name"], ["sgd"]), "name: expected a string"),
    (_set(["name"], "lamb"), "cannot run on the servers"),
    (_set(["extra"], 1), r"unknown field\(s\) extra"),
    (_drop(["params"]), r"missing field\(s\) params"),
    (_set(["params", "__class__"], "x"), r"unknown field\(s\) __class__"),
    (_set(["params", "beta1"], 0.9), r"unknown field\(s\) beta1"),
    (_drop(["params", "momentum"]), r"missing field\(s\) momentum"),
    (_set(["params", "momentum"], "0.9"), "momentum: expected a number"),
    (_set(["params", "momentum"], True), "momentum: expected a number"),
    (_set(["params", "momentum"], float("nan")), "expected a finite number"),
    (_set(["params", "wd"], float("inf")), "expected a finite number"),
    (_set(["params", "wd"], {"$eval": "1"}), "wd: expected a number"),
    (_set(["params", "lazy_update"], 1), "lazy_update: expected true or false"),
    (_set(["params", "begin_num_update"], -1), "expected an integer >= 0"),
    (_set(["params", "begin_num_update"], 1.5), "expected an integer"),
    (_set(["num_update"], "7"), "num_update: expected an integer"),
    (_set(["lr_mult"], [1, 2]), "lr_mult: expected an object"),
    (_set(["lr_mult", "0"], "2"), "expected a number"),
    (_set(["wd_mult", "x" * 5000], 1.0), "at most 1024 characters"),
    (_set(["lr_scheduler"], "FactorScheduler"), "lr_scheduler: expected an object"),
    (_set(["lr_scheduler", "type"], "LambdaScheduler"), "unknown scheduler"),
    (_set(["lr_scheduler", "type"], "FactorScheduler"), "unknown field"),
    (_set(["lr_scheduler", "factor"], 2.0), "MXNet rejected MultiFactorScheduler"),
    (_set(["lr_scheduler", "step"], [3, 2]), "MXNet rejected MultiFactorScheduler"),
    (_set(["lr_scheduler", "step"], []), "non-empty list"),
    (_set(["lr_scheduler", "cur_step_ind"], 9), "past the end of step"),
    (_set(["lr_scheduler", "warmup_mode"], "exp"), "'linear' or 'constant'"),
    (_set(["lr_scheduler", "__dict__"], {}), r"unknown field\(s\) __dict__"),
    (_set(["params", "learning_rate"], -0.0), None),   # odd but valid: accepted
]


@pytest.mark.parametrize("mutate,message", HOSTILE)
def test_hostile_description_rejected(mutate, message):
    desc = _valid()
    mutate(desc)
    if message is None:
        ro.make_updater(desc)
        return
    with pytest.raises(ValueError, match=message):
        ro.make_updater(desc)


@pytest.mark.parametrize("desc", [None, [], "sgd", 3, {"format": ro.FORMAT}])
def test_non_object_or_empty_description_rejected(desc):
    with pytest.raises(ValueError):
        ro.make_updater(desc)


def test_shadowed_registry_entry_rejected():
    builtin = mx.optimizer.Optimizer.opt_registry["adagrad"]
    try:
        with pytest.warns(UserWarning):
            @mx.optimizer.register
            class AdaGrad(mx.optimizer.SGD):   # noqa: F811 - shadows the built-in name
                def __init__(self, eps=0.0, **kwargs):
                    super().__init__(**kwargs)
        with pytest.raises(ValueError, match="not MXNet's built-in class"):
            ro.make_updater(roundtrip(ro.describe(builtin(learning_rate=0.1))))
    finally:
        mx.optimizer.Optimizer.opt_registry["adagrad"] = builtin


# -- hostile state bytes ---------------------------------------------------

def _trained():
    desc = _valid()
    updater = ro.make_updater(desc)
    train(updater, make_weights(), 3, seed=4)
    return desc, updater.dump_states()


def _split(blob):
    magic, version, hlen = struct.unpack_from("<8sIQ", blob)
    header = json.loads(blob[20:20 + hlen])
    return magic, version, header, blob[20 + hlen:]


def _join(header, payload, magic=b"RDMAKVOS", version=1):
    raw = json.dumps(header).encode()
    return struct.pack("<8sIQ", magic, version, len(raw)) + raw + payload


def _edit(fn):
    def mutate(blob):
        magic, version, header, payload = _split(blob)
        fn(header)
        return _join(header, payload)
    return mutate


HOSTILE_STATES = [
    (lambda b: b"", "too short"),
    (lambda b: b"\x80\x04\x95" + b[3:], "bad magic"),
    (lambda b: b[:8] + struct.pack("<I", 2) + b[12:], "unsupported version 2"),
    (lambda b: b[:12] + struct.pack("<Q", 1 << 40) + b[20:], "header length"),
    (lambda b: b[:60], "header length"),
    (lambda b: b[:20] + b"}" + b[21:], "not valid JSON"),
    (lambda b: b[:-4], "past the end of the"),
    (lambda b: b + b"\0" * 4, "payload has"),
    (_edit(lambda h: h.update(optimizer="adam")), "saved for optimizer 'adam'"),
    (_edit(lambda h: h.update(extra=1)), r"unknown field\(s\) extra"),
    (_edit(lambda h: h.update(num_update=-3)), "num_update: expected an integer >= 0"),
    (_edit(lambda h: h.update(scheduler=None)), "saved without a learning-rate scheduler"),
    (_edit(lambda h: h["scheduler"].update(base_lr="1")), "base_lr: expected a number"),
    (_edit(lambda h: h["arrays"][0].update(offset=4)), "starts at byte 4"),
    (_edit(lambda h: h["arrays"][0].update(nbytes=3)), "bytes do not hold"),
    (_edit(lambda h: h["arrays"][0].update(dtype="object")), "one of float16"),
    (_edit(lambda h: h["arrays"][0].update(shape=[2, 2])), "1-D shape"),
    (_edit(lambda h: h["entries"][0].update(state=None)), "expected null|expected an array"),
    (_edit(lambda h: h["entries"][0].update(state={"array": 1})), "shape"),
    (_edit(lambda h: h["entries"][1].update(state={"array": 0})), "used twice"),
    (_edit(lambda h: h["entries"][0].update(state={"tuple": [{"array": 0}]})),
     "expected an array reference"),
    (_edit(lambda h: h["entries"][0].update(size=8)), "array has shape"),
    (_edit(lambda h: h["entries"][0].update(dtype="int64")), "one of float16"),
    (_edit(lambda h: h["entries"][0].update(key="")), "non-empty string"),
    (_edit(lambda h: h["entries"][0].update(count=1.0)), "count: expected an integer"),
    (_edit(lambda h: h["entries"].append(copy.deepcopy(h["entries"][0]))), "duplicate key"),
    (_edit(lambda h: h["entries"].pop()), "not referenced"),
    (_edit(lambda h: h["entries"][0].update(__reduce__="os.system")), "unknown field"),
]


@pytest.mark.parametrize("mutate,message", HOSTILE_STATES)
def test_hostile_state_rejected_and_updater_unchanged(mutate, message):
    desc, blob = _trained()
    target = ro.make_updater(desc)
    train(target, make_weights(), 2, seed=5)
    before = target.dump_states()
    with pytest.raises(ValueError, match=message):
        target.load_states(mutate(blob))
    assert target.dump_states() == before


def test_nan_in_header_rejected():
    desc, blob = _trained()
    magic, version, header, payload = _split(blob)
    raw = json.dumps(header).replace('"num_update": 3', '"num_update": NaN').encode()
    with pytest.raises(ValueError, match="NaN"):
        ro.make_updater(desc).load_states(struct.pack("<8sIQ", magic, version, len(raw))
                                          + raw + payload)


def test_deeply_nested_header_rejected():
    desc, _ = _trained()
    raw = b"[" * 100000 + b"]" * 100000
    with pytest.raises(ValueError, match="not valid JSON"):
        ro.make_updater(desc).load_states(struct.pack("<8sIQ", b"RDMAKVOS", 1, len(raw)) + raw)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_fuzzed_state_bytes_load_or_raise_valueerror(data):
    desc, blob = _FUZZ_BASE
    pos = data.draw(st.integers(0, len(blob) - 1))
    mode = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    if mode == "flip":
        byte = data.draw(st.integers(0, 255))
        mutated = blob[:pos] + bytes([byte]) + blob[pos + 1:]
    elif mode == "truncate":
        mutated = blob[:pos]
    else:
        mutated = blob[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + blob[pos:]
    updater = ro.make_updater(desc)
    try:
        updater.load_states(mutated)
    except ValueError:
        return
    # Whatever loaded must be usable.
    train(updater, make_weights(), 1, seed=6)


_FUZZ_BASE = None


def setup_module(module):
    module._FUZZ_BASE = _trained()
