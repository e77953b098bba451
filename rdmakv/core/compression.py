"""Gradient compression settings: the one place a user's compression dict is
read (pure; the codecs themselves are rdmakv/native/codec.c).

Accepted forms, for `KVStore(compression=...)`, `declare(..., compression=...)`
and rdmakv.mxnet's `set_gradient_compression`:

- MXNet's: ``{'type': '2bit', 'threshold': 0.5}`` (threshold defaults to 0.5,
  must be > 0; '2bit' is the only type MXNet 1.9.1 has).
- BytePS's ``compression_params`` names: ``compressor`` (onebit, topk, randomk,
  dithering), ``ef`` ("vanilla"), ``momentum`` ("nesterov", with ``mu``, the
  momentum, since the store has no optimizer to read it from; BytePS's
  DistributedTrainer takes it from optimizer_params), ``scaling`` (onebit),
  ``k`` (topk/randomk: a fraction of each chunk when below 1, else a count of
  elements; dithering: the number of levels), ``partition`` (linear, natural),
  ``normalize`` (max, l2), ``seed``, ``fp16`` (True: cast to float16 for the
  wire; beside a ``compressor`` the compressor alone decides the wire bytes).
- A name alone: ``'2bit'``, ``'fp16'``, ``'none'``; None means no compression.

Compression.wire() is what DECLARE carries, and Compression.from_wire() reads
it back on the server, refusing anything another node could not have sent."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

# enum rk_codec_kind (rdmakv/native/codec.h)
KINDS = {"none": 0, "fp16": 1, "2bit": 2, "onebit": 3, "topk": 4, "randomk": 5, "dithering": 6}
BYTEPS_COMPRESSORS = ("onebit", "topk", "randomk", "dithering")
PARTITIONS = ("linear", "natural")
NORMALIZE = ("max", "l2")
# codecs_byteps.h: RK_DITHER_MAX_LINEAR_LEVELS (16-bit codes), RK_DITHER_MAX_NATURAL_LEVELS (2^30 the top level)
DITHERING_MAX_LEVELS = {"linear": 32767, "natural": 31}
MXNET_DEFAULT_THRESHOLD = 0.5
BYTEPS_NAMES = {"compressor", "ef", "momentum", "mu", "scaling", "k", "partition", "normalize", "seed", "fp16"}


class CompressionError(ValueError):
    """Compression settings that cannot be used, naming the setting."""


@dataclass(frozen=True)
class Compression:
    """A key's compression, the same on every node."""
    kind: str = "none"
    error_feedback: bool = False
    scaling: bool = False
    partition: str = "linear"
    normalize: str = "max"
    k: float = 0.0                # topk/randomk: fraction (< 1) or count; dithering: levels
    threshold: float = 0.0        # 2bit
    momentum: float = 0.0         # nesterov mu; 0 = none
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def count_kept(self, count: int) -> int:
        """topk/randomk: elements kept of a chunk of count (BytePS: k < 1 is a fraction, floored; at least 1)."""
        kept = math.floor(self.k * count) if self.k < 1 else int(self.k)
        return max(1, min(count, kept)) if count else 0

    def codec(self, count: int):
        """The native Codec of a chunk of count float32 values (raises ValueError for a
        kind this build does not implement)."""
        from rdmakv.native import transport
        return transport.Codec(
            KINDS[self.kind], error_feedback=self.error_feedback, scaled=self.scaling,
            dither_partition=PARTITIONS.index(self.partition), dither_normalize=NORMALIZE.index(self.normalize),
            k=self.count_kept(count) if self.kind in ("topk", "randomk") else 0,
            levels=int(self.k) if self.kind == "dithering" else 0,
            threshold=self.threshold, momentum=self.momentum, seed=self.seed)

    def for_server(self) -> Compression:
        """What a server encodes sums with: no momentum (BytePS's servers build their
        compressors without it; momentum belongs to the worker's gradient)."""
        return replace(self, momentum=0.0)

    def wire(self) -> Optional[dict]:
        """What DECLARE carries (None: no compression)."""
        return asdict(self) if self.active else None

    @classmethod
    def from_wire(cls, obj: Any) -> Compression:
        """A DECLARE's compression, checked field by field (a hostile peer's too)."""
        if obj is None:
            return NONE
        if not isinstance(obj, dict) or set(obj) != set(cls.__dataclass_fields__):
            raise CompressionError(f"compression {obj!r} does not have the fields {sorted(cls.__dataclass_fields__)}")
        types = {"kind": str, "error_feedback": bool, "scaling": bool, "partition": str, "normalize": str,
                 "k": (int, float), "threshold": (int, float), "momentum": (int, float), "seed": int}
        for name, kind in types.items():
            value = obj[name]
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise CompressionError(f"compression field {name!r} is {value!r}")
        made = cls(**{**obj, "k": float(obj["k"]), "threshold": float(obj["threshold"]),
                      "momentum": float(obj["momentum"])})
        made._check()
        return made

    def _check(self):
        if self.kind not in KINDS:
            raise CompressionError(f"unknown compression {self.kind!r}; one of {', '.join(KINDS)}")
        if self.partition not in PARTITIONS:
            raise CompressionError(f"partition {self.partition!r} is not one of {', '.join(PARTITIONS)}")
        if self.normalize not in NORMALIZE:
            raise CompressionError(f"normalize {self.normalize!r} is not one of {', '.join(NORMALIZE)}")
        for name in ("k", "threshold", "momentum"):
            if not math.isfinite(getattr(self, name)):
                raise CompressionError(f"{name} {getattr(self, name)!r} is not a finite number")
        if self.kind == "2bit" and not self.threshold > 0:
            raise CompressionError(f"threshold must be greater than 0, got {self.threshold!r}")
        if self.kind in ("topk", "randomk") and not (self.k > 0 and (self.k < 1 or self.k == int(self.k))):
            raise CompressionError(f"{self.kind} needs k, a fraction in (0, 1) or a whole count >= 1; got {self.k!r}")
        if self.kind == "dithering" and not (self.k >= 1 and self.k == int(self.k)):
            raise CompressionError(f"dithering needs k, its number of levels (a whole number >= 1); got {self.k!r}")
        if self.kind == "dithering" and self.k > DITHERING_MAX_LEVELS[self.partition]:
            raise CompressionError(f"dithering with a {self.partition} partition takes at most "
                                   f"{DITHERING_MAX_LEVELS[self.partition]} levels (k); got {self.k!r}")
        if not 0 <= self.momentum < 1:
            raise CompressionError(f"momentum mu must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.seed < 2**64:
            raise CompressionError(f"seed must be in [0, 2**64), got {self.seed!r}")


NONE = Compression()


def _number(params, name, default):
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)      # MXNet passes its params through as strings too
        except (TypeError, ValueError):
            raise CompressionError(f"compression {name!r} must be a number, got {value!r}") from None
    return float(value)


def _flag(params, name):
    value = params.get(name, False)
    if isinstance(value, str):        # BytePS passes str(bool) through its parameters
        if value.lower() not in ("true", "false", "0", "1"):
            raise CompressionError(f"compression {name!r} must be a boolean, got {value!r}")
        return value.lower() in ("true", "1")
    if not isinstance(value, (bool, int)):
        raise CompressionError(f"compression {name!r} must be a boolean, got {value!r}")
    return bool(value)


def _mxnet(params):
    unknown = set(params) - {"type", "threshold"}
    if unknown:
        raise CompressionError(f"unknown MXNet gradient compression parameter(s) {sorted(unknown)}; "
                               f"MXNet takes 'type' and 'threshold'")
    kind = params["type"]
    if kind != "2bit":
        raise CompressionError(f"Unknown type for gradient compression {kind!r} (MXNet 1.9.1 has only '2bit')")
    made = Compression(kind="2bit", threshold=_number(params, "threshold", MXNET_DEFAULT_THRESHOLD))
    made._check()
    return made


def _byteps(params):
    unknown = set(params) - BYTEPS_NAMES
    if unknown:
        raise CompressionError(f"unknown compression parameter(s) {sorted(unknown)}; BytePS's are "
                               f"{', '.join(sorted(BYTEPS_NAMES))} (or MXNet's 'type' and 'threshold')")
    compressor = params.get("compressor")
    if compressor is None:
        kind = "fp16" if _flag(params, "fp16") else "none"
    elif compressor not in BYTEPS_COMPRESSORS:
        raise CompressionError(f"compressor {compressor!r} is not one of {', '.join(BYTEPS_COMPRESSORS)}")
    else:
        kind = compressor
    ef = params.get("ef")
    if ef not in (None, "", "vanilla"):
        raise CompressionError(f"ef {ef!r} is not supported; 'vanilla' is")
    momentum = params.get("momentum")
    mu = 0.0
    if isinstance(momentum, (int, float)) and not isinstance(momentum, bool):
        mu = float(momentum)
    elif momentum not in (None, "", "nesterov"):
        raise CompressionError(f"momentum {momentum!r} is not supported; 'nesterov' (with mu) is")
    elif momentum == "nesterov":
        if "mu" not in params:
            raise CompressionError("momentum 'nesterov' needs 'mu', the momentum (BytePS's trainer reads it from "
                                   "optimizer_params['momentum'])")
        mu = _number(params, "mu", 0.0)
    if kind in ("topk", "randomk", "dithering") and "k" not in params:
        raise CompressionError(f"compressor {kind!r} needs 'k'")
    seed = params.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CompressionError(f"seed must be an integer, got {seed!r}")
    made = Compression(kind=kind, error_feedback=ef == "vanilla", scaling=_flag(params, "scaling"),
                       partition=params.get("partition", "linear"), normalize=params.get("normalize", "max"),
                       k=_number(params, "k", 0.0), momentum=mu, seed=seed)
    made._check()
    return made


def parse(params: Any) -> Compression:
    """A user's compression setting (see the module's docstring) as a Compression."""
    if params is None:
        return NONE
    if isinstance(params, Compression):
        return params
    if isinstance(params, str):
        if params not in ("none", "fp16", "2bit"):
            raise CompressionError(f"compression {params!r}: a name alone is 'none', 'fp16' or '2bit'; "
                                   f"give a dict for BytePS's compressors")
        return _mxnet({"type": "2bit"}) if params == "2bit" else Compression(kind=params)
    if not isinstance(params, dict):
        raise CompressionError(f"compression must be a dict, a name or None, got {type(params).__name__}")
    if "type" in params:
        return _mxnet(params)
    return _byteps(params)
