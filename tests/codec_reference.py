"""numpy's own versions of the codecs rdmakv/native/codec.c implements, written
from their specifications (MXNet 1.9.1's src/kvstore/gradient_compression-inl.h
for 2bit; IEEE half precision for fp16), so tests compare the C code against
something it does not share."""
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
