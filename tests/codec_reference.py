"""numpy's own versions of the codecs rdmakv/native/codec.c implements, written
from their specifications (MXNet 1.9.1's src/kvstore/gradient_compression-inl.h
for 2bit; IEEE half precision for fp16; codecs_byteps.h's formats for BytePS's
onebit, top-k, random-k and dithering, byte for byte), so tests compare the C
code against something it does not share."""
import numpy as np

POS = np.array([0xC0, 0x30, 0x0C, 0x03], np.uint8)   # value j of a 16-value block: byte j//4, these bits
NEG = np.array([0x80, 0x20, 0x08, 0x02], np.uint8)


def twobit_encode(grad, residual, threshold):
    """MXNet's quantize_2bit: (the packed bytes, the new residual); residual is not changed."""
    t = np.float32(threshold)
    r = residual.astype(np.float32) + grad.astype(np.float32)
    pos = r >= t
    neg = ~pos & (r <= -t)
    new = r.copy()
    new[pos] -= t
    new[neg] -= -t
    n = len(grad)
    out = np.zeros(4 * ((n + 15) // 16), np.uint8)
    index = np.arange(n)
    byte = (index // 16) * 4 + (index % 16) // 4
    np.bitwise_or.at(out, byte[pos], POS[index[pos] % 4])
    np.bitwise_or.at(out, byte[neg], NEG[index[neg] % 4])
    return out.tobytes(), new


def twobit_decode(data, count, threshold):
    """MXNet's dequantize_2bit: float32 values."""
    raw = np.frombuffer(data, np.uint8)
    index = np.arange(count)
    field = raw[(index // 16) * 4 + (index % 16) // 4] & POS[index % 4]
    out = np.zeros(count, np.float32)
    out[field == POS[index % 4]] = np.float32(threshold)
    out[field == NEG[index % 4]] = -np.float32(threshold)
    return out


def fp16_encode(values):
    return values.astype(np.float32).astype(np.float16).tobytes()


def fp16_decode(data):
    return np.frombuffer(data, np.float16).astype(np.float32)


# ---- BytePS's compressors (codecs_byteps.h) ----
GAMMA = np.uint64(0x9E3779B97F4A7C15)
MASK64 = (1 << 64) - 1


def splitmix64(state, count):
    """(the next count outputs of splitmix64 from state, the state after)."""
    with np.errstate(over="ignore"):
        z = np.uint64(state) + GAMMA * np.arange(1, count + 1, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z, (state + count * int(GAMMA)) & MASK64


def lane_sum(values):
    """codecs_byteps.c's lane_sum: value i into lane i % 8, each lane summed in
    order in double, then the lanes in order."""
    values = np.asarray(values, np.float64)
    padded = np.concatenate([values, np.zeros(-values.size % 8)]).reshape(-1, 8)
    total = 0.0
    for lane in np.add.accumulate(padded, axis=0)[-1]:
        total += lane
    return total


def unit_floats(bits):
    return (bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)


# ---- onebit ----

def onebit_encode(x, scaled=True):
    x = np.asarray(x, np.float32)
    if not scaled:
        scale = np.float32(1.0)
    elif x.size:
        scale = np.float32(lane_sum(np.abs(x.astype(np.float64))) / x.size)
    else:
        scale = np.float32(0.0)
    signs = np.packbits(x < 0, bitorder="little")
    return scale.tobytes() + signs.tobytes()


def onebit_decode(data, count):
    scale = np.frombuffer(data[:4], np.float32)[0]
    negative = np.unpackbits(np.frombuffer(data[4:], np.uint8), count=count, bitorder="little").astype(bool)
    return np.where(negative, -scale, scale).astype(np.float32)


# ---- top-k, random-k ----

def sparse_bytes(indices, values):
    return np.asarray(indices, np.uint32).tobytes() + np.asarray(values, np.float32).tobytes()


def topk_indices(x, k):
    """The min(k, len) indices of largest |x| (a NaN above all), ties to the lower index, ascending."""
    magnitude = (x.view(np.uint32) & 0x7FFFFFFF).astype(np.int64)    # as float bits: NaN above inf
    order = np.lexsort((np.arange(x.size), -magnitude))     # by magnitude down, then index up
    return np.sort(order[:min(k, x.size)])


def topk_encode(x, k):
    x = np.asarray(x, np.float32)
    kept = topk_indices(x, k)
    return sparse_bytes(kept, x[kept])


def randomk_indices(count, k, state):
    """Selection sampling: index i is taken when floor(r * remaining / 2^64) < still needed."""
    n = min(k, count)
    bits, _ = splitmix64(state, count)
    kept, drawn = [], 0
    for i in range(count):
        if len(kept) == n:
            break
        drawn += 1
        if (int(bits[i]) * (count - i)) >> 64 < n - len(kept):
            kept.append(i)
    return np.array(kept, np.int64), (state + drawn * int(GAMMA)) & MASK64


def randomk_encode(x, k, state):
    x = np.asarray(x, np.float32)
    kept, state = randomk_indices(x.size, k, state)
    return sparse_bytes(kept, x[kept]), state


def sparse_decode(data, count):
    n = len(data) // 8
    dense = np.zeros(count, np.float32)
    dense[np.frombuffer(data[:4 * n], np.uint32)] = np.frombuffer(data[4 * n:], np.float32)
    return dense


# ---- dithering ----

def code_bits(levels):
    return 1 + int(levels).bit_length()


def dithering_levels(levels, partition):
    """Magnitude of each level index m, in units of norm: m / s, or 2^(m-1) / 2^(s-1)."""
    m = np.arange(levels + 1)
    if partition == "linear":
        return m / levels
    return np.where(m == 0, 0.0, np.ldexp(1.0, m - levels))


def dithering_encode(x, levels, partition, normalize, state):
    x = np.asarray(x, np.float32)
    if normalize == "max":
        norm = np.float32(np.abs(x).max()) if x.size else np.float32(0)
    else:
        norm = np.float32(np.sqrt(lane_sum(x.astype(np.float64) ** 2)))
    top = float(levels) if partition == "linear" else 2.0 ** (levels - 1)
    per_norm = top / float(norm) if norm > 0 and np.isfinite(norm) else 0.0     # not finite: every code 0
    bits, state = splitmix64(state, x.size)
    u = unit_floats(bits)
    with np.errstate(invalid="ignore"):       # inf * 0: NaN, made 0 below
        t = (np.abs(x.astype(np.float64)) * per_norm).astype(np.float32)
    t = np.where(np.isnan(t), np.float32(0), t)
    if partition == "linear":
        low = np.floor(t)
        m = low.astype(np.int64) + (u < t - low)
    else:                 # t in [2^(e-1), 2^e): between level indices e and e + 1
        _, exponent = np.frexp(t)
        low = np.ldexp(np.float32(1), exponent - 1).astype(np.float32)
        above = u < t / low - np.float32(1)
        m = np.where(t < 1, u < t, exponent + above).astype(np.int64)
    m = np.minimum(m, levels)
    codes = np.where(m > 0, (m << 1) | (x < 0), 0)
    width = code_bits(levels)
    bitplanes = ((codes[:, None] >> np.arange(width)) & 1).astype(np.uint8).ravel()
    return norm.tobytes() + np.packbits(bitplanes, bitorder="little").tobytes(), state


def dithering_decode(data, count, levels, partition):
    norm = np.frombuffer(data[:4], np.float32)[0]
    width = code_bits(levels)
    bitplanes = np.unpackbits(np.frombuffer(data[4:], np.uint8), count=count * width, bitorder="little")
    codes = (bitplanes.reshape(count, width).astype(np.int64) << np.arange(width)).sum(axis=1)
    m, negative = codes >> 1, (codes & 1).astype(bool)
    if partition == "linear":
        magnitude = m.astype(np.float32) * (norm / np.float32(levels))
    else:
        magnitude = np.where(m == 0, np.float32(0) * norm, np.ldexp(norm, (m - levels).astype(np.int32)))
    return np.where(negative, -magnitude, magnitude).astype(np.float32)
