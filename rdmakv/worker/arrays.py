"""The tensors a worker is given: numpy views of numpy, buffer-protocol and
DLPack arrays, with the checks that name what is wrong with one."""
from __future__ import annotations

import numpy as np

from rdmakv.core import protocol
from rdmakv.worker.keys import DTYPE_CODE_OF, key_name

# DLPack's DLDeviceType values (dlpack.h): those numpy can view are host memory.
HOST_DLPACK_DEVICES = (1, 3, 11)      # CPU, CUDA pinned host, ROCm pinned host
DLPACK_DEVICES = {2: "CUDA", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI", 10: "ROCm", 12: "extension-device",
                  13: "CUDA managed", 14: "oneAPI", 15: "WebGPU", 16: "Hexagon"}


def as_array(obj, what, writable=False, key=None):
    """A numpy view (no copy) of a C-contiguous numpy, buffer-protocol or DLPack array.
    Errors name `what` (and the key, if given)."""
    if type(obj) is np.ndarray and obj.dtype in DTYPE_CODE_OF and obj.flags.c_contiguous \
            and (obj.flags.writeable or not writable):
        return obj                    # the common case, without building any message
    if key is not None:
        what = f"{what} of key {key_name(key)!r}"
    if isinstance(obj, np.ndarray):
        array = obj
    elif hasattr(obj, "__dlpack__"):
        if hasattr(obj, "__dlpack_device__"):
            kind, index = obj.__dlpack_device__()
            if kind not in HOST_DLPACK_DEVICES:
                raise TypeError(f"{what} is in {DLPACK_DEVICES.get(kind, f'DLPack device type {kind}')} memory "
                                f"(device {index}); rdmakv sums host memory: copy it to the CPU first")
        array = np.from_dlpack(obj)
        if writable and not array.flags.writeable:
            array = _writable_dlpack_view(array)
    else:
        try:
            array = np.asarray(memoryview(obj))
        except TypeError:
            raise TypeError(f"{what} must be a numpy array or support the buffer protocol or DLPack, "
                            f"not {type(obj).__name__}") from None
    if array.dtype not in DTYPE_CODE_OF:
        raise TypeError(f"{what} has dtype {array.dtype}, which rdmakv does not sum; "
                        f"use one of {', '.join(protocol.DTYPE_CODES)}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{what} is not C-contiguous; pass numpy.ascontiguousarray({what})")
    if writable and not array.flags.writeable:
        raise ValueError(f"{what} is read-only, so the result cannot be written into it; pass a writable out=")
    return array


def _writable_dlpack_view(array):
    """numpy < 2.1 marks every DLPack import read-only because DLPack 0.x had no
    read-only flag; the producer's memory is writable by that protocol's rules,
    so view the same memory writably, keeping the import alive as its base."""
    import ctypes
    if array.nbytes == 0:
        return np.empty(array.shape, array.dtype)
    memory = (ctypes.c_char * array.nbytes).from_address(array.__array_interface__["data"][0])
    memory._keepalive = array
    return np.frombuffer(memory, array.dtype).reshape(array.shape)
