"""Server-side optimizers for the MXNet KVStore, described declaratively.

A worker calls :func:`describe` on an ``mx.optimizer.Optimizer`` and sends the
resulting JSON-safe dict to every server; a server calls :func:`make_updater`
on what it received.  The description comes from the network, so
:func:`make_updater` accepts only known optimizer and scheduler names and
known fields of known types, evaluates nothing and unpickles nothing.

The updater keeps one optimizer state per ``(key, chunk)``: servers hold a key
as contiguous 1-D chunks of the flattened tensor, and update each chunk on its
own.  That is exact for element-wise optimizers (SGD, Adam, ...), which are the
ones supported.  Optimizers whose update depends on the whole tensor (LAMB and
LARS use layer norms, GroupAdaGrad uses rows) or on a global counter advanced
per update call (Nadam's ``m_schedule``) or on MXNet's global random state
(SGLD) give results that depend on partitioning or cannot resume identically;
:func:`describe` rejects them with the reason.

:meth:`Updater.dump_states` writes a self-describing binary format (a JSON
header followed by raw little-endian arrays), never pickle, holding everything
that drives later updates: the states, each chunk's update count, the
optimizer's ``num_update`` and the learning-rate scheduler's mutable fields, so
that training resumes bit-identically.

This module imports MXNet lazily; importing it without MXNet works, calling it
does not.
"""
import json
import math
import os
import struct
import sys
import threading
import warnings

import numpy as np

FORMAT = "rdmakv.optimizer/1"
"""Value of the ``format`` field of a description."""

STATE_MAGIC = b"RDMAKVOS"
STATE_VERSION = 1
_STATE_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length

MAX_KEY_CHARS = 1024
MAX_MULT_ENTRIES = 1 << 20
MAX_SCHEDULE_STEPS = 1 << 16
MAX_HEADER_BYTES = 1 << 30
_STATE_DTYPES = ("float16", "float32", "float64")


_import_lock = threading.Lock()


def _mxnet():
    """Import MXNet, also inside an rdmakv server or scheduler process.

    ``import mxnet`` runs ``mxnet/kvstore/kvstore_server.py``, which asks
    ps-lite whether this process is a worker - by reading ``DMLC_ROLE`` - and,
    if not, starts MXNet's own parameter server and never returns.  rdmakv
    servers share the DMLC_* variables, so the import says "worker" for the
    duration of the import."""
    module = sys.modules.get("mxnet")
    if module is not None and hasattr(module, "optimizer"):
        return module
    with _import_lock:
        role = os.environ.get("DMLC_ROLE")
        if role is None or role == "worker":
            import mxnet
            return mxnet
        os.environ["DMLC_ROLE"] = "worker"
        try:
            import mxnet
        finally:
            os.environ["DMLC_ROLE"] = role
        return mxnet


# ---------------------------------------------------------------------------
# Field validators.  Each takes (where, value) and returns the checked value or
# raises ValueError naming the field.

def _fail(where, what, value):
    raise ValueError("%s: expected %s, got %s" % (where, what, _short(value)))


def _short(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _float(where, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(where, "a number", value)
    value = float(value)
    if not math.isfinite(value):
        _fail(where, "a finite number", value)
    return value


def _opt_float(where, value):
    return None if value is None else _float(where, value)


def _int(where, value, low=0):
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(where, "an integer", value)
    if value < low:
        _fail(where, "an integer >= %d" % low, value)
    return value


def _nonneg_int(where, value):
    return _int(where, value, 0)


def _pos_int(where, value):
    return _int(where, value, 1)


def _any_int(where, value):
    return _int(where, value, -(1 << 62))


def _bool(where, value):
    if not isinstance(value, bool):
        _fail(where, "true or false", value)
    return value


def _warmup_mode(where, value):
    if value not in ("linear", "constant"):
        _fail(where, "'linear' or 'constant'", value)
    return value


def _steps(where, value):
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SCHEDULE_STEPS:
        _fail(where, "a non-empty list of at most %d integers" % MAX_SCHEDULE_STEPS, value)
    return [_pos_int("%s[%d]" % (where, i), v) for i, v in enumerate(value)]


def _key(where, value):
    if not isinstance(value, str) or not 0 < len(value) <= MAX_KEY_CHARS:
        _fail(where, "a non-empty string of at most %d characters" % MAX_KEY_CHARS, value)
    return value


def _mult_table(where, value):
    if not isinstance(value, dict) or len(value) > MAX_MULT_ENTRIES:
        _fail(where, "an object of at most %d entries" % MAX_MULT_ENTRIES, value)
    return {_key("%s key" % where, k): _float("%s[%r]" % (where, k), v)
            for k, v in value.items()}


def _check_fields(where, data, spec):
    """Check that ``data`` is a dict whose keys are exactly those of ``spec``."""
    if not isinstance(data, dict):
        _fail(where, "an object", data)
    unknown = sorted(str(k) for k in data if k not in spec)
    if unknown:
        raise ValueError("%s: unknown field(s) %s; allowed: %s"
                         % (where, ", ".join(unknown), ", ".join(sorted(spec))))
    missing = sorted(k for k in spec if k not in data)
    if missing:
        raise ValueError("%s: missing field(s) %s" % (where, ", ".join(missing)))
    return {k: check("%s.%s" % (where, k), data[k]) for k, check in spec.items()}


# ---------------------------------------------------------------------------
# Optimizers.  Common constructor fields of mx.optimizer.Optimizer, then per
# optimizer: registered name -> {constructor argument: (attribute, validator)}.

_COMMON = {
    "learning_rate": ("lr", _opt_float),
    "wd": ("wd", _float),
    "rescale_grad": ("rescale_grad", _float),
    "clip_gradient": ("clip_gradient", _opt_float),
    "begin_num_update": ("begin_num_update", _nonneg_int),
    "multi_precision": ("multi_precision", _bool),
}

_OPTIMIZERS = {
    "sgd": {"momentum": ("momentum", _float), "lazy_update": ("lazy_update", _bool)},
    "ccsgd": {"momentum": ("momentum", _float), "lazy_update": ("lazy_update", _bool)},
    "nag": {"momentum": ("momentum", _float)},
    "signum": {"momentum": ("momentum", _float), "wd_lh": ("wd_lh", _float)},
    "ftml": {"beta1": ("beta1", _float), "beta2": ("beta2", _float),
             "epsilon": ("epsilon", _float)},
    "dcasgd": {"momentum": ("momentum", _float), "lamda": ("lamda", _float)},
    "adam": {"beta1": ("beta1", _float), "beta2": ("beta2", _float),
             "epsilon": ("epsilon", _float), "lazy_update": ("lazy_update", _bool)},
    "adagrad": {"eps": ("float_stable_eps", _float)},
    "rmsprop": {"gamma1": ("gamma1", _float), "gamma2": ("gamma2", _float),
                "epsilon": ("epsilon", _float), "centered": ("centered", _bool),
                "clip_weights": ("clip_weights", _opt_float)},
    "adadelta": {"rho": ("rho", _float), "epsilon": ("epsilon", _float)},
    "ftrl": {"lamda1": ("lamda1", _float), "beta": ("beta", _float)},
    "adamax": {"beta1": ("beta1", _float), "beta2": ("beta2", _float)},
}

_REJECTED = {
    "lamb": "its trust ratio uses the norm of the whole tensor, but servers update "
            "each chunk of a key separately",
    "lars": "its learning rate uses the norms of the whole tensor, but servers update "
            "each chunk of a key separately",
    "lbsgd": "it keeps cumulative gradient norms over whole tensors, but servers update "
             "each chunk of a key separately",
    "groupadagrad": "its history is per row of the tensor, but servers see flat chunks",
    "nadam": "its m_schedule advances on every update call, so its result would depend "
             "on how keys are split into chunks and across servers",
    "sgld": "it draws noise from MXNet's global random state, which cannot be saved, "
            "so training could not resume identically",
    "test": "it is MXNet's test optimizer",
}

_UNSUPPORTED_HINT = "; use Trainer(update_on_kvstore=False) to run it on the workers"


def _optimizer_classes():
    mx = _mxnet()
    opt = mx.optimizer
    return {"sgd": opt.SGD, "ccsgd": opt.ccSGD, "nag": opt.NAG, "signum": opt.Signum,
            "ftml": opt.FTML, "dcasgd": opt.DCASGD, "adam": opt.Adam,
            "adagrad": opt.AdaGrad, "rmsprop": opt.RMSProp, "adadelta": opt.AdaDelta,
            "ftrl": opt.Ftrl, "adamax": opt.Adamax}


# ---------------------------------------------------------------------------
# Learning-rate schedulers: type -> {attribute: (validator, constructor arg)}.
# A description records every attribute, including the ones a scheduler
# mutates as it runs (base_lr, count, cur_step_ind), so it can be rebuilt in
# the exact state it was described in.

_WARMUP = {
    "base_lr": (_float, None),
    "warmup_final_lr": (_float, "base_lr"),
    "warmup_steps": (_nonneg_int, "warmup_steps"),
    "warmup_begin_lr": (_float, "warmup_begin_lr"),
    "warmup_mode": (_warmup_mode, "warmup_mode"),
}

_SCHEDULERS = {
    "FactorScheduler": dict(_WARMUP, step=(_pos_int, "step"), factor=(_float, "factor"),
                            stop_factor_lr=(_float, "stop_factor_lr"),
                            count=(_nonneg_int, None)),
    "MultiFactorScheduler": dict(_WARMUP, step=(_steps, "step"), factor=(_float, "factor"),
                                 cur_step_ind=(_nonneg_int, None),
                                 count=(_nonneg_int, None)),
    "PolyScheduler": dict(_WARMUP, max_update=(_pos_int, "max_update"),
                          power=(_float, "pwr"), base_lr_orig=(_float, None),
                          final_lr=(_float, "final_lr"), max_steps=(_any_int, None)),
    "CosineScheduler": dict(_WARMUP, max_update=(_pos_int, "max_update"),
                            base_lr_orig=(_float, None), final_lr=(_float, "final_lr"),
                            max_steps=(_any_int, None)),
}

# Attributes that change while the scheduler runs; dump_states saves them.
_SCHEDULER_MUTABLE = {
    "FactorScheduler": ("base_lr", "count"),
    "MultiFactorScheduler": ("base_lr", "count", "cur_step_ind"),
    "PolyScheduler": ("base_lr",),
    "CosineScheduler": ("base_lr",),
}


def _scheduler_class(name):
    mx = _mxnet()
    return getattr(mx.lr_scheduler, name)


def _describe_scheduler(sched):
    mx = _mxnet()
    name = type(sched).__name__
    if name not in _SCHEDULERS or type(sched) is not getattr(mx.lr_scheduler, name, None):
        raise ValueError(
            "cannot describe learning-rate scheduler %s.%s: only MXNet's built-in %s "
            "can run on the servers" % (type(sched).__module__, type(sched).__qualname__,
                                        ", ".join(sorted(_SCHEDULERS))))
    out = {"type": name}
    for attr, (check, _) in _SCHEDULERS[name].items():
        value = getattr(sched, attr)
        if attr == "power" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[attr] = check("lr_scheduler.%s" % attr, value)
    return out


def _build_scheduler(desc):
    where = "lr_scheduler"
    if not isinstance(desc, dict):
        _fail(where, "an object or null", desc)
    name = desc.get("type")
    if not isinstance(name, str) or name not in _SCHEDULERS:
        raise ValueError("%s.type: unknown scheduler %s; allowed: %s"
                         % (where, _short(name), ", ".join(sorted(_SCHEDULERS))))
    spec = {"type": lambda w, v: v}
    spec.update({attr: check for attr, (check, _) in _SCHEDULERS[name].items()})
    fields = _check_fields(where, desc, spec)
    if name == "MultiFactorScheduler" and fields["cur_step_ind"] > len(fields["step"]):
        raise ValueError("%s.cur_step_ind: %d is past the end of step"
                         % (where, fields["cur_step_ind"]))
    kwargs = {arg: fields[attr] for attr, (_, arg) in _SCHEDULERS[name].items() if arg}
    try:
        sched = _scheduler_class(name)(**kwargs)
    except (ValueError, AssertionError, TypeError) as exc:
        raise ValueError("%s: MXNet rejected %s(%s): %s"
                         % (where, name, kwargs, exc or type(exc).__name__)) from None
    for attr in _SCHEDULERS[name]:
        setattr(sched, attr, fields[attr])
    return sched


# ---------------------------------------------------------------------------
# describe / make_optimizer / make_updater

def describe(optimizer):
    """Describe an MXNet optimizer as a JSON-safe dict that :func:`make_updater`
    can rebuild.

    Covers MXNet's built-in element-wise optimizers (see ``supported()``),
    their hyper-parameters, the built-in learning-rate schedulers with their
    current state, ``num_update``, and per-key learning-rate and weight-decay
    multipliers.  Multipliers are resolved the way MXNet resolves them
    (``param_dict``, then ``lr_mult[index]``, then ``lr_mult[name]``) and
    written under ``str(index)``, the key a KVStore sees; multipliers given by
    name are kept under the name.

    Raises ValueError for anything it cannot describe faithfully: custom
    optimizer or scheduler classes, and built-ins whose update is not
    element-wise (the message says why).
    """
    mx = _mxnet()
    if not isinstance(optimizer, mx.optimizer.Optimizer):
        raise TypeError("describe() needs an mx.optimizer.Optimizer, got %s"
                        % type(optimizer).__name__)
    classes = _optimizer_classes()
    name = None
    for candidate, cls in classes.items():
        if type(optimizer) is cls:
            name = candidate
    if name is None:
        registered = type(optimizer).__name__.lower()
        builtin = getattr(mx.optimizer, type(optimizer).__name__, None) is type(optimizer)
        if builtin and registered in _REJECTED:
            raise ValueError("cannot run optimizer %r on the servers: %s%s"
                             % (registered, _REJECTED[registered], _UNSUPPORTED_HINT))
        raise ValueError(
            "cannot describe optimizer class %s.%s: only MXNet's built-in optimizers %s "
            "can run on the servers%s" % (type(optimizer).__module__,
                                          type(optimizer).__qualname__,
                                          ", ".join(sorted(classes)), _UNSUPPORTED_HINT))
    params = {}
    for arg, (attr, check) in list(_COMMON.items()) + list(_OPTIMIZERS[name].items()):
        params[arg] = check("optimizer %s" % attr, getattr(optimizer, attr))
    sched = optimizer.lr_scheduler
    if sched is None and params["learning_rate"] is None:
        raise ValueError("optimizer has neither a learning rate nor a scheduler")
    return {
        "format": FORMAT,
        "name": name,
        "params": params,
        "lr_scheduler": None if sched is None else _describe_scheduler(sched),
        "num_update": _nonneg_int("optimizer num_update", optimizer.num_update),
        "lr_mult": _resolve_mult(optimizer, "lr_mult"),
        "wd_mult": _resolve_mult(optimizer, "wd_mult"),
    }


def _resolve_mult(optimizer, which):
    table = getattr(optimizer, which)
    out = {}
    indices = set(optimizer.param_dict) | set(optimizer.idx2name)
    indices |= {k for k in table if isinstance(k, int) and not isinstance(k, bool)}
    for index in indices:
        if index in optimizer.param_dict:
            value = getattr(optimizer.param_dict[index], which)
        elif index in table:
            value = table[index]
        elif index in optimizer.idx2name:
            value = table.get(optimizer.idx2name[index], 1.0)
        else:
            continue
        out[key_name(index)] = _float("optimizer %s[%r]" % (which, index), value)
    for key, value in table.items():
        if isinstance(key, str) and key not in out:
            out[key] = _float("optimizer %s[%r]" % (which, key), value)
    return out


def key_name(key):
    """The name servers use for a key, as rdmakv.worker.keys.key_name: str keys as
    they are, int keys as "#<int>"."""
    return key if isinstance(key, str) else "#%d" % key


def supported():
    """Names of the optimizers that can run on the servers."""
    return sorted(_OPTIMIZERS)


def _validate(description):
    if not isinstance(description, dict):
        _fail("optimizer description", "an object", description)
    if description.get("format") != FORMAT:
        raise ValueError("optimizer description: format must be %r, got %s"
                         % (FORMAT, _short(description.get("format"))))
    name = description.get("name")
    if not isinstance(name, str):
        _fail("optimizer description.name", "a string", name)
    if name in _REJECTED:
        raise ValueError("optimizer description: %r cannot run on the servers: %s"
                         % (name, _REJECTED[name]))
    if name not in _OPTIMIZERS:
        raise ValueError("optimizer description: unknown optimizer %s; allowed: %s"
                         % (_short(name), ", ".join(sorted(_OPTIMIZERS))))
    pspec = {arg: check for arg, (_, check) in
             list(_COMMON.items()) + list(_OPTIMIZERS[name].items())}
    spec = {
        "format": lambda w, v: v,
        "name": lambda w, v: v,
        "params": lambda w, v: _check_fields("optimizer description.params", v, pspec),
        "lr_scheduler": lambda w, v: v,   # checked by _build_scheduler
        "num_update": _nonneg_int,
        "lr_mult": _mult_table,
        "wd_mult": _mult_table,
    }
    fields = _check_fields("optimizer description", description, spec)
    if fields["lr_scheduler"] is None and fields["params"]["learning_rate"] is None:
        raise ValueError("optimizer description: needs a learning_rate or an lr_scheduler")
    return fields


def make_optimizer(description):
    """Rebuild the ``mx.optimizer.Optimizer`` that ``description`` describes.

    Every field is validated first; the result's class is checked to be the
    built-in one (a process could have registered another class under the
    same name)."""
    mx = _mxnet()
    fields = _validate(description)
    name, params = fields["name"], dict(fields["params"])
    sched = None
    if fields["lr_scheduler"] is not None:
        sched = _build_scheduler(fields["lr_scheduler"])
    lr = params.pop("learning_rate")
    try:
        # Pass the scheduler without a learning rate, so MXNet does not
        # overwrite the scheduler's (already described) base_lr.
        opt = mx.optimizer.create(name, lr_scheduler=sched,
                                  learning_rate=None if sched is not None else lr, **params)
    except (ValueError, AssertionError, TypeError) as exc:
        raise ValueError("optimizer description: MXNet rejected %s(%s): %s"
                         % (name, params, exc)) from None
    if type(opt) is not _optimizer_classes()[name]:
        raise ValueError("optimizer %r is registered to %s.%s in this process, not MXNet's "
                         "built-in class" % (name, type(opt).__module__, type(opt).__name__))
    opt.lr = lr
    opt.num_update = fields["num_update"]
    opt.lr_mult = dict(fields["lr_mult"])
    opt.wd_mult = dict(fields["wd_mult"])
    return opt


def make_updater(description):
    """Build a server-side :class:`Updater` from a description that came from
    the network (see :func:`describe`).  Raises ValueError on anything
    unexpected."""
    return Updater(make_optimizer(description), description)


# ---------------------------------------------------------------------------
# Updater

class Updater:
    """Applies one optimizer to chunks of keys, keeping state per (key, chunk).

    ``update(key, chunk, weight, grad)`` updates the numpy array ``weight`` in
    place.  Each (key, chunk) gets its own optimizer index, whose name is the
    key, so per-key learning-rate and weight-decay multipliers apply to all of
    the key's chunks.  Not thread-safe: a server calls it from one thread, or
    under its own lock.
    """

    def __init__(self, optimizer, description=None):
        self.optimizer = optimizer
        self.name = type(optimizer).__name__.lower()
        self.description = description
        self._index = {}      # (key, chunk) -> optimizer index
        self._states = {}     # optimizer index -> state tree
        self._shapes = {}     # optimizer index -> (size, dtype)
        optimizer.param_dict = {}
        optimizer.idx2name = {}

    def _index_of(self, key, chunk):
        index = self._index.get((key, chunk))
        if index is None:
            index = len(self._index)
            self._index[(key, chunk)] = index
            self.optimizer.idx2name[index] = key
        return index

    def update(self, key, chunk, weight, grad):
        """Update ``weight`` (1-D numpy array) in place with ``grad``."""
        mx = _mxnet()
        if not isinstance(key, str):
            raise TypeError("key must be a str, got %s" % type(key).__name__)
        _nonneg_int("chunk", chunk)
        if not isinstance(weight, np.ndarray) or not isinstance(grad, np.ndarray):
            raise TypeError("weight and grad must be numpy arrays")
        if weight.shape != grad.shape:
            raise ValueError("key %r chunk %d: weight shape %s != grad shape %s"
                             % (key, chunk, weight.shape, grad.shape))
        if not weight.flags.writeable:
            raise ValueError("key %r chunk %d: weight is read-only" % (key, chunk))
        index = self._index_of(key, chunk)
        size_dtype = (weight.size, weight.dtype.name)
        w = mx.nd.array(weight.reshape(-1), dtype=weight.dtype)
        g = mx.nd.array(grad.reshape(-1), dtype=grad.dtype)
        if index not in self._states:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._states[index] = self.optimizer.create_state_multi_precision(index, w)
            self._shapes[index] = size_dtype
        elif self._shapes[index] != size_dtype:
            raise ValueError("key %r chunk %d: has %d %s elements, but its optimizer state "
                             "was made for %d %s elements"
                             % ((key, chunk) + size_dtype + self._shapes[index]))
        self.optimizer.update_multi_precision(index, w, g, self._states[index])
        np.copyto(weight, w.asnumpy().reshape(weight.shape))

    # -- serialization ----------------------------------------------------

    def dump_states(self):
        """Serialize all states and counters (no pickle; see module docs)."""
        opt = self.optimizer
        arrays = []
        entries = []
        for (key, chunk), index in sorted(self._index.items(), key=lambda kv: kv[1]):
            if index not in self._states:
                continue
            size, dtype = self._shapes[index]
            entries.append({
                "key": key, "chunk": chunk, "size": size, "dtype": dtype,
                "count": opt._index_update_count.get(index, opt.begin_num_update),
                "state": _encode_tree(self._states[index], arrays, 0),
            })
        sched = opt.lr_scheduler
        header = {
            "optimizer": self.name,
            "num_update": opt.num_update,
            "scheduler": None if sched is None else
            {attr: getattr(sched, attr) for attr in _SCHEDULER_MUTABLE[type(sched).__name__]},
            "entries": entries,
            "arrays": [],
        }
        payload = []
        offset = 0
        for arr in arrays:
            data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            header["arrays"].append({"dtype": arr.dtype.name, "shape": list(arr.shape),
                                     "offset": offset, "nbytes": len(data)})
            payload.append(data)
            offset += len(data)
        blob = json.dumps(header, allow_nan=False, separators=(",", ":")).encode("utf-8")
        return b"".join([_STATE_PREFIX.pack(STATE_MAGIC, STATE_VERSION, len(blob)), blob]
                        + payload)

    def load_states(self, data):
        """Replace all states and counters with those in ``data`` (from
        :meth:`dump_states`).  Everything is validated before anything is
        changed; raises ValueError on malformed or mismatched data."""
        mx = _mxnet()
        header, payload = _parse_state_blob(data)
        opt = self.optimizer
        where = "optimizer state"
        if header["optimizer"] != self.name:
            raise ValueError("%s: saved for optimizer %s, but this updater runs %r"
                             % (where, _short(header["optimizer"]), self.name))
        arrays = []
        offset = 0
        for i, meta in enumerate(header["arrays"]):
            arr = _decode_array("%s.arrays[%d]" % (where, i), meta, payload, offset)
            offset += arr.nbytes
            arrays.append(arr)
        if offset != len(payload):
            raise ValueError("%s: payload has %d bytes, arrays describe %d"
                             % (where, len(payload), offset))
        sched = opt.lr_scheduler
        sched_state = header["scheduler"]
        if (sched is None) != (sched_state is None):
            raise ValueError("%s: saved %s a learning-rate scheduler, but this optimizer %s"
                             % (where, "without" if sched_state is None else "with",
                                "has one" if sched is not None else "has none"))
        if sched is not None:
            name = type(sched).__name__
            mutable = {a: _SCHEDULERS[name][a][0] for a in _SCHEDULER_MUTABLE[name]}
            sched_state = _check_fields("%s.scheduler" % where, sched_state, mutable)
        index_map, states, shapes, counts = {}, {}, {}, {}
        used = set()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, entry in enumerate(header["entries"]):
                ew = "%s.entries[%d]" % (where, i)
                entry = _check_fields(ew, entry, {
                    "key": _key, "chunk": _nonneg_int, "size": _nonneg_int,
                    "dtype": _state_dtype, "count": _nonneg_int,
                    "state": lambda w, v: v})
                chunk_id = (entry["key"], entry["chunk"])
                if chunk_id in index_map:
                    raise ValueError("%s: duplicate key %r chunk %d" % ((ew,) + chunk_id))
                index = len(index_map)
                index_map[chunk_id] = index
                # The state must have exactly the structure this optimizer
                # would create for such a weight.
                template = opt.create_state_multi_precision(
                    index, mx.nd.zeros((entry["size"],), dtype=entry["dtype"]))
                states[index] = _decode_tree(ew + ".state", entry["state"], template,
                                             arrays, used, 0)
                shapes[index] = (entry["size"], entry["dtype"])
                counts[index] = entry["count"]
        if len(used) != len(arrays):
            raise ValueError("%s: %d arrays are not referenced by any state"
                             % (where, len(arrays) - len(used)))
        # Validation done: commit.
        self._index = index_map
        self._states = states
        self._shapes = shapes
        opt.idx2name = {index: key for (key, _), index in index_map.items()}
        opt._all_index_update_counts = {0: counts}
        opt._index_update_count = counts
        opt.num_update = header["num_update"]
        if sched is not None:
            for attr, value in sched_state.items():
                setattr(sched, attr, value)


def _state_dtype(where, value):
    if value not in _STATE_DTYPES:
        _fail(where, "one of %s" % ", ".join(_STATE_DTYPES), value)
    return value


def _encode_tree(state, arrays, depth):
    mx = _mxnet()
    if depth > 4:
        raise ValueError("optimizer state nests too deeply")
    if state is None:
        return None
    if isinstance(state, mx.nd.NDArray):
        if state.stype != "default":
            raise ValueError("cannot save sparse optimizer state")
        arrays.append(state.asnumpy())
        return {"array": len(arrays) - 1}
    if isinstance(state, (tuple, list)):
        return {type(state).__name__: [_encode_tree(s, arrays, depth + 1) for s in state]}
    raise ValueError("cannot save optimizer state of type %s" % type(state).__name__)


def _decode_tree(where, node, template, arrays, used, depth):
    """Rebuild a state tree from ``node``, requiring it to match ``template``."""
    mx = _mxnet()
    if depth > 4:
        raise ValueError("%s: nests too deeply" % where)
    if template is None:
        if node is not None:
            _fail(where, "null", node)
        return None
    if isinstance(template, mx.nd.NDArray):
        if not isinstance(node, dict) or set(node) != {"array"}:
            _fail(where, "an array reference", node)
        i = _nonneg_int(where + ".array", node["array"])
        if i >= len(arrays) or i in used:
            raise ValueError("%s: array %d is out of range or used twice" % (where, i))
        arr = arrays[i]
        if arr.shape != template.shape or arr.dtype != template.dtype:
            raise ValueError("%s: array has shape %s dtype %s, expected %s %s"
                             % (where, arr.shape, arr.dtype, template.shape, template.dtype))
        used.add(i)
        return mx.nd.array(arr, dtype=arr.dtype)
    kind = type(template).__name__
    if not isinstance(node, dict) or set(node) != {kind} or not isinstance(node[kind], list) \
            or len(node[kind]) != len(template):
        _fail(where, "a %s of %d states" % (kind, len(template)), node)
    items = [_decode_tree("%s[%d]" % (where, j), n, t, arrays, used, depth + 1)
             for j, (n, t) in enumerate(zip(node[kind], template))]
    return tuple(items) if isinstance(template, tuple) else items


def _parse_state_blob(data):
    where = "optimizer state"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("%s must be bytes, got %s" % (where, type(data).__name__))
    data = bytes(data)
    if len(data) < _STATE_PREFIX.size:
        raise ValueError("%s: %d bytes is too short" % (where, len(data)))
    magic, version, hlen = _STATE_PREFIX.unpack_from(data)
    if magic != STATE_MAGIC:
        raise ValueError("%s: bad magic %r (not an rdmakv optimizer state)" % (where, magic))
    if version != STATE_VERSION:
        raise ValueError("%s: unsupported version %d (this build reads %d)"
                         % (where, version, STATE_VERSION))
    start = _STATE_PREFIX.size
    if hlen > MAX_HEADER_BYTES or start + hlen > len(data):
        raise ValueError("%s: header length %d exceeds the %d bytes present"
                         % (where, hlen, len(data) - start))
    try:
        header = json.loads(data[start:start + hlen].decode("utf-8"),
                            parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError("%s: header is not valid JSON: %s" % (where, exc)) from None
    header = _check_fields(where, header, {
        "optimizer": lambda w, v: v, "num_update": _nonneg_int,
        "scheduler": lambda w, v: v, "entries": _list, "arrays": _list})
    return header, memoryview(data)[start + hlen:]


def _reject_constant(name):
    raise ValueError("optimizer state: header contains %s" % name)


def _list(where, value):
    if not isinstance(value, list):
        _fail(where, "a list", value)
    return value


def _decode_array(where, meta, payload, offset):
    meta = _check_fields(where, meta, {"dtype": _state_dtype, "shape": _list,
                                       "offset": _nonneg_int, "nbytes": _nonneg_int})
    shape = tuple(_nonneg_int("%s.shape" % where, d) for d in meta["shape"])
    if len(shape) != 1:
        raise ValueError("%s: expected a 1-D shape, got %s" % (where, list(shape)))
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    if meta["nbytes"] != shape[0] * dtype.itemsize:
        raise ValueError("%s: %d bytes do not hold %d %s"
                         % (where, meta["nbytes"], shape[0], meta["dtype"]))
    if meta["offset"] != offset:
        raise ValueError("%s: starts at byte %d, expected %d (arrays are stored back to back)"
                         % (where, meta["offset"], offset))
    end = meta["offset"] + meta["nbytes"]
    if end > len(payload):
        raise ValueError("%s: bytes %d..%d are past the end of the %d-byte payload"
                         % (where, meta["offset"], end, len(payload)))
    arr = np.frombuffer(payload[meta["offset"]:end], dtype=dtype)
    return arr.astype(np.dtype(meta["dtype"]), copy=True)
