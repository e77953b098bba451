# RDMA verbs mechanism: thin owners of libibverbs handles, in pyverbs' naming
# (Context, PD, MR, CompChannel, CQ, QP, WC).  No policy lives here: which
# device, port, GID, MTU or PSN to use, and when to register, is decided by
# rdmakv/transport/verbs_*.py.
#
# Ownership rules (docs/STYLE habits 2-3):
# - each C handle has exactly one owner; close() frees it once and sets it to
#   NULL, so a second close() does nothing;
# - children hold their parents strongly (self._pd, self._ctx, ...); parents
#   hold WeakSets of children and close them first: QP -> CQ -> MR -> PD ->
#   CompChannel -> Context;
# - __dealloc__ is a backstop that reads C fields only and never raises;
# - in a forked child, close() and __dealloc__ forget the handle without
#   calling the destroy verb: the uverbs file descriptor is shared with the
#   parent, and destroying through it would destroy the parent's objects.
#
# libibverbs reports failure three ways, each through one named checker:
# _check_ptr (NULL + errno), _check_rc (the return value is the errno) and
# _check_n (a negative count).  Work-completion failures are not errnos: they
# arrive in WC.status and become WorkCompletionError.

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from libc.string cimport memset, memcpy
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.errno cimport errno, EAGAIN, EINTR, EIO, ENODATA, ENOMEM, EPERM
from posix.unistd cimport getpid, pid_t
from posix.fcntl cimport fcntl, F_GETFL, F_SETFL, O_NONBLOCK
cimport rdmakv.native._verbs as v

import os as _os
import weakref as _weakref
from rdmakv.core.errors import VerbsError, WorkCompletionError, DeviceUnavailable

# Constants, under their verbs names, for the policy modules and tests.
IBV_ACCESS_LOCAL_WRITE = v.IBV_ACCESS_LOCAL_WRITE
IBV_ACCESS_REMOTE_WRITE = v.IBV_ACCESS_REMOTE_WRITE
IBV_ACCESS_REMOTE_READ = v.IBV_ACCESS_REMOTE_READ
IBV_ACCESS_REMOTE_ATOMIC = v.IBV_ACCESS_REMOTE_ATOMIC
IBV_QPT_RC = v.IBV_QPT_RC
IBV_QPT_UC = v.IBV_QPT_UC
IBV_QPS_RESET = v.IBV_QPS_RESET
IBV_QPS_INIT = v.IBV_QPS_INIT
IBV_QPS_RTR = v.IBV_QPS_RTR
IBV_QPS_RTS = v.IBV_QPS_RTS
IBV_QPS_ERR = v.IBV_QPS_ERR
IBV_MTU_256 = v.IBV_MTU_256
IBV_MTU_512 = v.IBV_MTU_512
IBV_MTU_1024 = v.IBV_MTU_1024
IBV_MTU_2048 = v.IBV_MTU_2048
IBV_MTU_4096 = v.IBV_MTU_4096
IBV_PORT_DOWN = v.IBV_PORT_DOWN
IBV_PORT_INIT = v.IBV_PORT_INIT
IBV_PORT_ARMED = v.IBV_PORT_ARMED
IBV_PORT_ACTIVE = v.IBV_PORT_ACTIVE
IBV_LINK_LAYER_UNSPECIFIED = v.IBV_LINK_LAYER_UNSPECIFIED
IBV_LINK_LAYER_INFINIBAND = v.IBV_LINK_LAYER_INFINIBAND
IBV_LINK_LAYER_ETHERNET = v.IBV_LINK_LAYER_ETHERNET
IBV_GID_TYPE_IB = v.IBV_GID_TYPE_IB
IBV_GID_TYPE_ROCE_V1 = v.IBV_GID_TYPE_ROCE_V1
IBV_GID_TYPE_ROCE_V2 = v.IBV_GID_TYPE_ROCE_V2
IBV_FORK_DISABLED = v.IBV_FORK_DISABLED
IBV_FORK_ENABLED = v.IBV_FORK_ENABLED
IBV_FORK_UNNEEDED = v.IBV_FORK_UNNEEDED
IBV_WC_SUCCESS = v.IBV_WC_SUCCESS
IBV_WC_SEND = v.IBV_WC_SEND
IBV_WC_RDMA_WRITE = v.IBV_WC_RDMA_WRITE
IBV_WC_RDMA_READ = v.IBV_WC_RDMA_READ
IBV_WC_RECV = v.IBV_WC_RECV
IBV_WC_RECV_RDMA_WITH_IMM = v.IBV_WC_RECV_RDMA_WITH_IMM
IBV_WC_WITH_IMM = v.IBV_WC_WITH_IMM

cdef enum:
    WC_BATCH = 64            # completions fetched per ibv_poll_cq call

cdef int _WRITE_ACCESS = (v.IBV_ACCESS_LOCAL_WRITE | v.IBV_ACCESS_REMOTE_WRITE
                          | v.IBV_ACCESS_REMOTE_ATOMIC)


cdef extern from *:
    """
    #include <errno.h>
    static inline void rdmakv_clear_errno(void) { errno = 0; }
    """
    void _clear_errno "rdmakv_clear_errno"() noexcept nogil


cdef int _os_errno() noexcept nogil:
    return errno if errno else EIO


# --- checkers ------------------------------------------------------------------
# Each takes the errno captured right after the call, inside the nogil block.

cdef inline int _check_ptr(const void *p, int err, op) except -1:
    """Pointer-returning verbs: NULL means failure, errno says why."""
    if p != NULL:
        return 0
    raise VerbsError(err, op)


cdef inline int _check_rc(int rc, op) except -1:
    """Verbs whose non-zero return value is the errno (ibv_post_send, ...)."""
    if rc == 0:
        return 0
    # A few providers return -1 and set errno instead; report that errno.
    raise VerbsError(rc if rc > 0 else _os_errno(), op)


cdef inline int _check_n(int n, int err, op) except -1:
    """Count-returning verbs (ibv_poll_cq): negative means failure."""
    if n >= 0:
        return 0
    raise VerbsError(err if err else EIO, op)


# --- is libibverbs there at all? ---------------------------------------------
# The extension is not linked against libibverbs (rdmakv/native/__init__.py loads it
# with RTLD_GLOBAL).  At import, _verbs_bind.h looks up every function at
# its current symbol version; if that fails, every entry point that can
# reach libibverbs raises DeviceUnavailable through _need_libibverbs().

cdef const char *_missing = v.rdmakv_verbs_bind()
HAVE_LIBIBVERBS = _missing == NULL
"""True when libibverbs' functions were found (loaded before this module)."""
_BIND_ERROR = None if _missing == NULL else _missing.decode()


cdef int _need_libibverbs() except -1:
    if not HAVE_LIBIBVERBS:
        raise DeviceUnavailable(f"libibverbs is not usable: {_BIND_ERROR} was not found "
                                "(is rdma-core's libibverbs1 installed? see rdmakv.native.libibverbs_error)")
    return 0


# --- module functions ------------------------------------------------------------

def get_device_names():
    """Names of the RDMA devices libibverbs sees, in its order.

    Raises VerbsError when the list cannot be read; errno ENOSYS there means
    this kernel has no RDMA support at all."""
    cdef v.ibv_device **devs
    cdef int n = 0, err, i
    _need_libibverbs()
    with nogil:
        devs = v.ibv_get_device_list(&n)
        err = errno
    _check_ptr(devs, err, "ibv_get_device_list")
    try:
        return [v.ibv_get_device_name(devs[i]).decode() for i in range(n)]
    finally:
        v.ibv_free_device_list(devs)


def fork_init():
    """ibv_fork_init(): 0, or the errno (EINVAL: memory was already registered)."""
    _need_libibverbs()
    return v.ibv_fork_init()


def is_fork_initialized():
    """ibv_is_fork_initialized(): IBV_FORK_DISABLED, _ENABLED or _UNNEEDED;
    -1 where libibverbs is older than rdma-core 35 and cannot say."""
    _need_libibverbs()
    return v.rdmakv_is_fork_initialized()


def wc_status_str(int status):
    """ibv_wc_status_str() for a numeric work-completion status."""
    _need_libibverbs()
    return v.ibv_wc_status_str(<v.ibv_wc_status>status).decode()


cdef inline bint _forked(pid_t owner) noexcept:
    return getpid() != owner


cdef _close_all(children):
    for child in list(children):
        child.close()


# --- Context -----------------------------------------------------------------------

@cython.no_gc_clear
cdef class Context:
    """An open RDMA device (ibv_open_device).  Context(name=None) opens the
    named device, or the first one libibverbs lists."""
    cdef object __weakref__      # parents track children in WeakSets
    cdef v.ibv_context *_handle
    cdef pid_t _pid
    cdef readonly str name
    cdef object pds, cqs, channels

    def __cinit__(self):
        self._handle = NULL
        self._pid = getpid()
        self.pds = _weakref.WeakSet()
        self.cqs = _weakref.WeakSet()
        self.channels = _weakref.WeakSet()

    def __init__(self, name=None):
        cdef v.ibv_device **devs
        cdef v.ibv_device *dev = NULL
        cdef int n = 0, err, i
        _need_libibverbs()
        with nogil:
            devs = v.ibv_get_device_list(&n)
            err = errno
        _check_ptr(devs, err, "ibv_get_device_list")
        try:
            names = []
            for i in range(n):
                names.append(v.ibv_get_device_name(devs[i]).decode())
                if dev == NULL and (name is None or names[i] == name):
                    dev = devs[i]
            if dev == NULL:
                if n == 0:
                    raise DeviceUnavailable("no RDMA devices")
                raise DeviceUnavailable(f"no RDMA device named {name!r}; found {', '.join(names)}")
            self.name = v.ibv_get_device_name(dev).decode()
            with nogil:
                self._handle = v.ibv_open_device(dev)
                err = errno
            _check_ptr(self._handle, err, f"ibv_open_device({self.name})")
        finally:
            v.ibv_free_device_list(devs)

    cdef int _alive(self) except -1:
        if self._handle == NULL:
            raise ValueError(f"Context {self.name!r} is closed")
        return 0

    @property
    def handle(self):
        return <size_t>self._handle

    @property
    def closed(self):
        return self._handle == NULL

    @property
    def num_comp_vectors(self):
        self._alive()
        return self._handle.num_comp_vectors

    def query_device(self):
        """ibv_query_device() as a dict (a subset of ibv_devinfo -v)."""
        cdef v.ibv_device_attr attr
        cdef int rc
        self._alive()
        memset(&attr, 0, sizeof(attr))
        with nogil:
            rc = v.ibv_query_device(self._handle, &attr)
        _check_rc(rc, f"ibv_query_device({self.name})")
        return {
            "fw_ver": attr.fw_ver.decode(errors="replace"),
            "node_guid": _guid_str(attr.node_guid),
            "sys_image_guid": _guid_str(attr.sys_image_guid),
            "vendor_id": attr.vendor_id,
            "vendor_part_id": attr.vendor_part_id,
            "hw_ver": attr.hw_ver,
            "phys_port_cnt": attr.phys_port_cnt,
            "max_mr_size": attr.max_mr_size,
            "max_qp": attr.max_qp,
            "max_qp_wr": attr.max_qp_wr,
            "max_sge": attr.max_sge,
            "max_cq": attr.max_cq,
            "max_cqe": attr.max_cqe,
            "max_mr": attr.max_mr,
            "max_pd": attr.max_pd,
            "max_qp_rd_atom": attr.max_qp_rd_atom,
            "max_qp_init_rd_atom": attr.max_qp_init_rd_atom,
        }

    def query_port(self, int port_num):
        """ibv_query_port() as a dict; enum fields are the verbs numbers."""
        cdef v.ibv_port_attr attr
        cdef int rc
        self._alive()
        memset(&attr, 0, sizeof(attr))
        with nogil:
            rc = v.rdmakv_query_port(self._handle, <uint8_t>port_num, &attr)
        _check_rc(rc, f"ibv_query_port({self.name}, {port_num})")
        return {
            "state": <int>attr.state,
            "max_mtu": <int>attr.max_mtu,
            "active_mtu": <int>attr.active_mtu,
            "gid_tbl_len": attr.gid_tbl_len,
            "max_msg_sz": attr.max_msg_sz,
            "lid": attr.lid,
            "sm_lid": attr.sm_lid,
            "link_layer": attr.link_layer,
            "active_width": attr.active_width,
            "active_speed": attr.active_speed,
            "phys_state": attr.phys_state,
        }

    def query_gid(self, int port_num, int index):
        """ibv_query_gid(): the 16 raw bytes of one GID table entry."""
        cdef v.ibv_gid gid
        cdef int rc, err
        self._alive()
        with nogil:
            rc = v.ibv_query_gid(self._handle, <uint8_t>port_num, index, &gid)
            err = errno
        if rc:
            raise VerbsError(err if err else EIO, f"ibv_query_gid({self.name}, {port_num}, {index})")
        return bytes(gid.raw[:16])

    def query_gid_entry(self, int port_num, int index):
        """ibv_query_gid_ex(): {'gid': bytes, 'gid_type': int, 'ndev_ifindex': int},
        or None for an empty slot (ENODATA)."""
        cdef v.ibv_gid_entry entry
        cdef int rc
        self._alive()
        memset(&entry, 0, sizeof(entry))
        with nogil:
            rc = v.rdmakv_query_gid_ex(self._handle, <uint32_t>port_num, <uint32_t>index, &entry)
        if rc == ENODATA:
            return None
        _check_rc(rc, f"ibv_query_gid_ex({self.name}, {port_num}, {index})")
        return {"gid": bytes(entry.gid.raw[:16]), "gid_type": entry.gid_type,
                "ndev_ifindex": entry.ndev_ifindex}

    cpdef close(self):
        """Close every child (CQs and their QPs, PDs and their MRs, channels),
        then the device.  Idempotent."""
        cdef int rc
        if self._handle == NULL:
            return
        if _forked(self._pid):
            self._handle = NULL
            return
        _close_all(self.cqs)
        _close_all(self.pds)
        _close_all(self.channels)
        with nogil:
            rc = v.ibv_close_device(self._handle)
        _check_rc(rc, f"ibv_close_device({self.name})")
        self._handle = NULL

    def __dealloc__(self):
        if self._handle != NULL and not _forked(self._pid):
            v.ibv_close_device(self._handle)
        self._handle = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<Context {self.name!r}{' closed' if self._handle == NULL else ''}>"


cdef str _guid_str(uint64_t be_guid):
    # node_guid is big-endian in memory; print it like ibv_devinfo does.
    cdef bytes raw = (<char *>&be_guid)[:8]
    h = raw.hex()
    return ":".join(h[i:i + 4] for i in range(0, 16, 4))


# --- PD ------------------------------------------------------------------------------

@cython.no_gc_clear
cdef class PD:
    """A protection domain (ibv_alloc_pd) on a Context."""
    cdef object __weakref__      # parents track children in WeakSets
    cdef v.ibv_pd *_handle
    cdef pid_t _pid
    cdef readonly Context context
    cdef object mrs, qps

    def __cinit__(self):
        self._handle = NULL
        self._pid = getpid()
        self.mrs = _weakref.WeakSet()
        self.qps = _weakref.WeakSet()

    def __init__(self, Context context not None):
        cdef int err
        context._alive()
        with nogil:
            self._handle = v.ibv_alloc_pd(context._handle)
            err = errno
        _check_ptr(self._handle, err, f"ibv_alloc_pd({context.name})")
        self.context = context
        context.pds.add(self)

    cdef int _alive(self) except -1:
        if self._handle == NULL:
            raise ValueError("PD is closed")
        return 0

    @property
    def handle(self):
        return <size_t>self._handle

    @property
    def closed(self):
        return self._handle == NULL

    cpdef close(self):
        """Close this PD's QPs and MRs, then deallocate it.  Idempotent."""
        cdef int rc
        if self._handle == NULL:
            return
        if not _forked(self._pid):
            _close_all(self.qps)
            _close_all(self.mrs)
            with nogil:
                rc = v.ibv_dealloc_pd(self._handle)
            _check_rc(rc, "ibv_dealloc_pd")
        self._handle = NULL
        self.context.pds.discard(self)
        self.context = None

    def __dealloc__(self):
        if self._handle != NULL and not _forked(self._pid):
            v.ibv_dealloc_pd(self._handle)
        self._handle = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- MR ------------------------------------------------------------------------------

def _memlock_hint(size_t length):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    def fmt(x):
        return "unlimited" if x == resource.RLIM_INFINITY else f"{x} bytes"
    return (f"Registering {length} bytes failed; the locked-memory limit RLIMIT_MEMLOCK "
            f"(`ulimit -l`) is {fmt(soft)} (hard limit {fmt(hard)}), probably too low. "
            "Raise it: `ulimit -l unlimited` in the launching shell, `* - memlock unlimited` "
            "in /etc/security/limits.conf, LimitMEMLOCK=infinity for a systemd unit, "
            "or `--ulimit memlock=-1` for a container")


@cython.no_gc_clear
cdef class MR:
    """A registered memory region over any contiguous buffer-protocol object.

    MR(pd, buffer, access=IBV_ACCESS_LOCAL_WRITE).  The buffer export is held
    from before ibv_reg_mr until after ibv_dereg_mr, so the memory the device
    may touch cannot be freed or resized while registered.  A writable export
    is requested only when access includes local, remote-write or atomic
    rights; a read-only buffer (bytes) can be registered with access=0 or
    IBV_ACCESS_REMOTE_READ."""
    cdef object __weakref__      # parents track children in WeakSets
    cdef v.ibv_mr *_handle
    cdef pid_t _pid
    cdef Py_buffer _view
    cdef bint _has_view
    cdef readonly PD pd
    cdef readonly int access

    def __cinit__(self):
        self._handle = NULL
        self._has_view = False
        self._pid = getpid()

    def __init__(self, PD pd not None, buffer, int access=v.IBV_ACCESS_LOCAL_WRITE):
        cdef int flags = PyBUF_ANY_CONTIGUOUS
        cdef int err
        cdef int acc = access
        pd._alive()
        if access & _WRITE_ACCESS:
            flags |= PyBUF_WRITABLE
        PyObject_GetBuffer(buffer, &self._view, flags)
        self._has_view = True
        if self._view.len == 0:
            self._release()
            raise ValueError("cannot register an empty buffer")
        with nogil:
            self._handle = v.ibv_reg_mr(pd._handle, self._view.buf, <size_t>self._view.len, acc)
            err = errno
        if self._handle == NULL:
            length = self._view.len
            self._release()
            if err in (ENOMEM, EPERM):
                raise VerbsError(err, "ibv_reg_mr", _memlock_hint(length))
            raise VerbsError(err, f"ibv_reg_mr({length} bytes, access={access:#x})")
        self.pd = pd
        self.access = access
        pd.mrs.add(self)

    cdef void _release(self) noexcept:
        if self._has_view:
            self._has_view = False
            PyBuffer_Release(&self._view)

    cdef int _alive(self) except -1:
        if self._handle == NULL:
            raise ValueError("MR is closed")
        return 0

    @property
    def handle(self):
        return <size_t>self._handle

    @property
    def closed(self):
        return self._handle == NULL

    @property
    def lkey(self):
        self._alive()
        return self._handle.lkey

    @property
    def rkey(self):
        self._alive()
        return self._handle.rkey

    @property
    def addr(self):
        """The registered start address (what a peer puts in remote_addr)."""
        self._alive()
        return <size_t>self._handle.addr

    @property
    def length(self):
        self._alive()
        return self._handle.length

    @property
    def buffer(self):
        """The object whose memory is registered (None once closed)."""
        return self._view.obj if self._has_view else None

    cpdef close(self):
        """ibv_dereg_mr, then release the buffer export.  Idempotent."""
        cdef int rc
        if self._handle != NULL:
            if not _forked(self._pid):
                with nogil:
                    rc = v.ibv_dereg_mr(self._handle)
                _check_rc(rc, "ibv_dereg_mr")
            self._handle = NULL
        self._release()
        if self.pd is not None:
            self.pd.mrs.discard(self)
            self.pd = None

    def __dealloc__(self):
        if self._handle != NULL and not _forked(self._pid):
            v.ibv_dereg_mr(self._handle)
        self._handle = NULL
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self._handle == NULL:
            return "<MR closed>"
        return (f"<MR addr={<size_t>self._handle.addr:#x} length={self._handle.length} "
                f"lkey={self._handle.lkey:#x} rkey={self._handle.rkey:#x}>")


cdef int _span(MR mr, size_t offset, object length, size_t *out_len) except -1:
    """Validate [offset, offset+length) inside mr; length None means to the end."""
    mr._alive()
    cdef size_t total = mr._handle.length
    cdef size_t n
    if offset > total:
        raise ValueError(f"offset {offset} is past the end of a {total}-byte MR")
    n = total - offset if length is None else <size_t>length
    if n > total - offset:
        raise ValueError(f"[{offset}, {offset + n}) is outside a {total}-byte MR")
    if n > 0xFFFFFFFF:
        raise ValueError(f"{n} bytes do not fit one scatter/gather entry (max 2**32-1)")
    out_len[0] = n
    return 0


# --- CompChannel ----------------------------------------------------------------------

@cython.no_gc_clear
cdef class CompChannel:
    """A completion event channel (ibv_create_comp_channel).  Its fd is made
    non-blocking, so a CQ wait never blocks inside ibv_get_cq_event."""
    cdef object __weakref__      # parents track children in WeakSets
    cdef v.ibv_comp_channel *_handle
    cdef pid_t _pid
    cdef readonly Context context
    cdef object cqs

    def __cinit__(self):
        self._handle = NULL
        self._pid = getpid()
        self.cqs = _weakref.WeakSet()

    def __init__(self, Context context not None):
        cdef int err, flags, rc
        context._alive()
        with nogil:
            self._handle = v.ibv_create_comp_channel(context._handle)
            err = errno
        _check_ptr(self._handle, err, "ibv_create_comp_channel")
        self.context = context
        context.channels.add(self)
        flags = fcntl(self._handle.fd, F_GETFL)
        rc = -1 if flags < 0 else fcntl(self._handle.fd, F_SETFL, flags | O_NONBLOCK)
        if rc < 0:
            err = errno
            self.close()
            raise VerbsError(err, "fcntl(O_NONBLOCK) on the completion channel")

    @property
    def fd(self):
        if self._handle == NULL:
            raise ValueError("CompChannel is closed")
        return self._handle.fd

    @property
    def closed(self):
        return self._handle == NULL

    cpdef close(self):
        """Close the CQs bound to this channel, then destroy it.  Idempotent."""
        cdef int rc
        if self._handle == NULL:
            return
        if not _forked(self._pid):
            _close_all(self.cqs)
            with nogil:
                rc = v.ibv_destroy_comp_channel(self._handle)
            _check_rc(rc, "ibv_destroy_comp_channel")
        self._handle = NULL
        self.context.channels.discard(self)
        self.context = None

    def __dealloc__(self):
        if self._handle != NULL and not _forked(self._pid):
            v.ibv_destroy_comp_channel(self._handle)
        self._handle = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- WC --------------------------------------------------------------------------------

@cython.freelist(64)
cdef class WC:
    """One work completion, copied out of the C ibv_wc.  imm_data is in host
    byte order, or None when the completion carried no immediate."""
    cdef readonly uint64_t wr_id
    cdef readonly int status
    cdef readonly int opcode
    cdef readonly uint32_t vendor_err
    cdef readonly uint32_t byte_len
    cdef readonly object imm_data
    cdef readonly uint32_t qp_num
    cdef readonly unsigned int wc_flags

    @property
    def ok(self):
        return self.status == v.IBV_WC_SUCCESS

    @property
    def status_str(self):
        return v.ibv_wc_status_str(<v.ibv_wc_status>self.status).decode()

    def error(self, completions=()):
        """The WorkCompletionError for this completion (not raised)."""
        return WorkCompletionError(self.status, self.status_str, self.vendor_err, self.wr_id,
                                   self.opcode, self.qp_num, completions)

    def check(self):
        """Raise WorkCompletionError unless the status is IBV_WC_SUCCESS."""
        if self.status != v.IBV_WC_SUCCESS:
            raise self.error((self,))
        return self

    def __repr__(self):
        imm = "" if self.imm_data is None else f" imm={self.imm_data:#x}"
        return (f"<WC wr_id={self.wr_id} {self.status_str} opcode={self.opcode} "
                f"byte_len={self.byte_len}{imm} qp={self.qp_num:#x}>")


cdef WC _wc_from(v.ibv_wc *c):
    cdef WC wc = WC.__new__(WC)
    wc.wr_id = c.wr_id
    wc.status = <int>c.status
    wc.opcode = <int>c.opcode
    wc.vendor_err = c.vendor_err
    wc.byte_len = c.byte_len
    wc.imm_data = v.ntohl(c.imm_data) if c.wc_flags & v.IBV_WC_WITH_IMM else None
    wc.qp_num = c.qp_num
    wc.wc_flags = c.wc_flags
    return wc


# --- CQ --------------------------------------------------------------------------------

cdef int _drain_event(v.ibv_comp_channel *ch, int *err) noexcept nogil:
    """Consume and acknowledge one pending event on a non-blocking channel:
    1 when one was taken, 0 when none was pending, -1 on error (err set)."""
    cdef v.ibv_cq *ev_cq = NULL
    cdef void *ev_ctx = NULL
    if v.ibv_get_cq_event(ch, &ev_cq, &ev_ctx) == 0:
        # Ack on the CQ the event names: a channel may be shared by CQs.
        v.ibv_ack_cq_events(ev_cq, 1)
        return 1
    if errno == EAGAIN or errno == EINTR:
        return 0
    err[0] = errno
    return -1


@cython.no_gc_clear
cdef class CQ:
    """A completion queue: CQ(context, cqe=256, channel=None, comp_vector=0).
    Without a channel, wait() falls back to polling with short sleeps."""
    cdef object __weakref__      # parents track children in WeakSets
    cdef v.ibv_cq *_handle
    cdef pid_t _pid
    cdef readonly Context context
    cdef readonly CompChannel channel
    cdef object qps

    def __cinit__(self):
        self._handle = NULL
        self._pid = getpid()
        self.qps = _weakref.WeakSet()

    def __init__(self, Context context not None, int cqe=256, CompChannel channel=None,
                 int comp_vector=0):
        cdef v.ibv_comp_channel *ch = NULL
        cdef int err
        context._alive()
        if channel is not None:
            if channel._handle == NULL:
                raise ValueError("CompChannel is closed")
            ch = channel._handle
        with nogil:
            self._handle = v.ibv_create_cq(context._handle, cqe, NULL, ch, comp_vector)
            err = errno
        _check_ptr(self._handle, err, f"ibv_create_cq(cqe={cqe})")
        self.context = context
        self.channel = channel
        context.cqs.add(self)
        if channel is not None:
            channel.cqs.add(self)

    cdef int _alive(self) except -1:
        if self._handle == NULL:
            raise ValueError("CQ is closed")
        return 0

    @property
    def handle(self):
        return <size_t>self._handle

    @property
    def closed(self):
        return self._handle == NULL

    @property
    def cqe(self):
        """The CQ's actual capacity (the device may round the request up)."""
        self._alive()
        return self._handle.cqe

    cdef int _poll(self, v.ibv_wc *wcs, int n) except -1:
        cdef int got, err
        with nogil:
            _clear_errno()
            got = v.ibv_poll_cq(self._handle, n, wcs)
            err = errno
        _check_n(got, err, "ibv_poll_cq")
        return got

    def poll(self, int max_entries=16):
        """Reap up to max_entries completions now, without waiting; failed
        completions are returned too (see WC.ok / WC.check)."""
        cdef v.ibv_wc wcs[WC_BATCH]
        cdef int got
        self._alive()
        out = []
        while max_entries > 0:
            got = self._poll(wcs, max_entries if max_entries < WC_BATCH else WC_BATCH)
            out.extend([_wc_from(&wcs[i]) for i in range(got)])
            if got < WC_BATCH:
                break
            max_entries -= got
        return out

    def wait(self, timeout=None, int max_entries=16, double spin_us=50.0, bint check=True):
        """Wait until at least one completion arrives and return the batch
        (up to max_entries); [] when timeout seconds pass first.

        Spins on ibv_poll_cq for spin_us, then arms the CQ
        (ibv_req_notify_cq) and sleeps in poll() on the channel fd, all with
        the GIL released, waking every 100 ms to honour signals.  With
        check=True a failed completion raises WorkCompletionError, whose
        .completions holds the whole batch."""
        cdef v.ibv_wc wcs[WC_BATCH]
        cdef int n = max_entries if max_entries < WC_BATCH else WC_BATCH
        cdef int got = 0, arm_rc = 0, ev_rc = 0, err = 0, slice_ms
        cdef double now = _now()
        cdef double deadline = now + (1e18 if timeout is None else <double>timeout)
        cdef double spin_end = now + spin_us * 1e-6
        cdef v.ibv_cq *cq
        cdef v.ibv_comp_channel *ch = NULL
        cdef s.pollfd pfd
        self._alive()
        if n < 1:
            raise ValueError("max_entries must be at least 1")
        cq = self._handle
        if self.channel is not None:
            ch = (<CompChannel>self.channel)._handle
        if spin_end > deadline:
            spin_end = deadline
        # 1. spin
        with nogil:
            while True:
                got = v.ibv_poll_cq(cq, n, wcs)
                if got != 0 or _now() >= spin_end:
                    break
        _check_n(got, EIO, "ibv_poll_cq")
        # 2. sleep on the channel (or nap-poll without one), a slice at a time
        while got == 0:
            now = _now()
            if now >= deadline:
                return []
            slice_ms = <int>((deadline - now) * 1000) + 1
            if slice_ms > POLL_SLICE_MS:
                slice_ms = POLL_SLICE_MS
            with nogil:
                if ch != NULL:
                    arm_rc = v.ibv_req_notify_cq(cq, 0)
                    if arm_rc == 0:
                        # Completions that landed before arming raise no event.
                        got = v.ibv_poll_cq(cq, n, wcs)
                        if got == 0:
                            pfd.fd = ch.fd
                            pfd.events = s.POLLIN
                            pfd.revents = 0
                            if s.poll(&pfd, 1, slice_ms) > 0:
                                ev_rc = _drain_event(ch, &err)
                            if ev_rc >= 0:
                                got = v.ibv_poll_cq(cq, n, wcs)
                else:
                    got = v.ibv_poll_cq(cq, n, wcs)
                    if got == 0:
                        s.poll(NULL, 0, 1)
            if arm_rc != 0:
                raise VerbsError(arm_rc if arm_rc > 0 else EIO, "ibv_req_notify_cq")
            if ev_rc < 0:
                raise VerbsError(err, "ibv_get_cq_event")
            _check_n(got, EIO, "ibv_poll_cq")
            if got == 0:
                PyErr_CheckSignals()
        out = [_wc_from(&wcs[i]) for i in range(got)]
        if check:
            for wc in out:
                if not (<WC>wc).status == v.IBV_WC_SUCCESS:
                    raise (<WC>wc).error(out)
        return out

    cpdef close(self):
        """Destroy the QPs using this CQ, then the CQ.  Idempotent."""
        cdef int rc
        if self._handle == NULL:
            return
        if not _forked(self._pid):
            _close_all(self.qps)
            with nogil:
                rc = v.ibv_destroy_cq(self._handle)
            _check_rc(rc, "ibv_destroy_cq")
        self._handle = NULL
        self.context.cqs.discard(self)
        if self.channel is not None:
            self.channel.cqs.discard(self)
        self.context = None
        self.channel = None

    def __dealloc__(self):
        if self._handle != NULL and not _forked(self._pid):
            v.ibv_destroy_cq(self._handle)
        self._handle = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- QP --------------------------------------------------------------------------------

_QP_INT_ATTRS = ("port_num", "pkey_index", "qp_access_flags", "path_mtu", "dest_qp_num",
                 "rq_psn", "sq_psn", "max_rd_atomic", "max_dest_rd_atomic", "min_rnr_timer",
                 "timeout", "retry_cnt", "rnr_retry", "ah")


@cython.no_gc_clear
cdef class QP:
    """A queue pair: QP(pd, send_cq, recv_cq=None, qp_type=IBV_QPT_RC,
    max_send_wr=128, max_recv_wr=128, max_send_sge=1, max_recv_sge=1,
    max_inline_data=64, sq_sig_all=False).  recv_cq defaults to send_cq.
    cap holds what the device actually granted."""
    cdef object __weakref__      # parents track children in WeakSets
    cdef v.ibv_qp *_handle
    cdef pid_t _pid
    cdef readonly PD pd
    cdef readonly CQ send_cq
    cdef readonly CQ recv_cq
    cdef readonly int qp_type
    cdef readonly int state
    cdef readonly dict cap
    cdef uint32_t _max_inline

    def __cinit__(self):
        self._handle = NULL
        self._pid = getpid()
        self.state = v.IBV_QPS_RESET

    def __init__(self, PD pd not None, CQ send_cq not None, CQ recv_cq=None,
                 int qp_type=v.IBV_QPT_RC, uint32_t max_send_wr=128, uint32_t max_recv_wr=128,
                 uint32_t max_send_sge=1, uint32_t max_recv_sge=1, uint32_t max_inline_data=64,
                 bint sq_sig_all=False):
        cdef v.ibv_qp_init_attr init
        cdef int err
        if recv_cq is None:
            recv_cq = send_cq
        pd._alive()
        send_cq._alive()
        recv_cq._alive()
        memset(&init, 0, sizeof(init))
        init.send_cq = send_cq._handle
        init.recv_cq = recv_cq._handle
        init.qp_type = <v.ibv_qp_type>qp_type
        init.sq_sig_all = sq_sig_all
        init.cap.max_send_wr = max_send_wr
        init.cap.max_recv_wr = max_recv_wr
        init.cap.max_send_sge = max_send_sge
        init.cap.max_recv_sge = max_recv_sge
        init.cap.max_inline_data = max_inline_data
        with nogil:
            self._handle = v.ibv_create_qp(pd._handle, &init)
            err = errno
        _check_ptr(self._handle, err,
                   f"ibv_create_qp(send_wr={max_send_wr}, recv_wr={max_recv_wr}, inline={max_inline_data})")
        # ibv_create_qp writes the granted capabilities back into init.cap.
        self.cap = {"max_send_wr": init.cap.max_send_wr, "max_recv_wr": init.cap.max_recv_wr,
                    "max_send_sge": init.cap.max_send_sge, "max_recv_sge": init.cap.max_recv_sge,
                    "max_inline_data": init.cap.max_inline_data}
        self._max_inline = init.cap.max_inline_data
        self.qp_type = qp_type
        self.pd = pd
        self.send_cq = send_cq
        self.recv_cq = recv_cq
        pd.qps.add(self)
        send_cq.qps.add(self)
        recv_cq.qps.add(self)

    cdef int _alive(self) except -1:
        if self._handle == NULL:
            raise ValueError("QP is closed")
        return 0

    @property
    def handle(self):
        return <size_t>self._handle

    @property
    def closed(self):
        return self._handle == NULL

    @property
    def qp_num(self):
        self._alive()
        return self._handle.qp_num

    @property
    def max_inline_data(self):
        return self._max_inline

    def modify(self, int qp_state, **attrs):
        """ibv_modify_qp to qp_state, setting exactly the attributes given;
        the attribute mask is built from the keywords.  Keywords: port_num,
        pkey_index, qp_access_flags, path_mtu, dest_qp_num, rq_psn, sq_psn,
        max_rd_atomic, max_dest_rd_atomic, min_rnr_timer, timeout, retry_cnt,
        rnr_retry, and ah={'dlid', 'sl', 'port_num', 'gid' (16 bytes, makes
        the path global), 'sgid_index', 'hop_limit', 'traffic_class',
        'flow_label'}."""
        cdef v.ibv_qp_attr attr
        cdef int mask = v.IBV_QP_STATE
        cdef int rc
        cdef bytes gid
        self._alive()
        memset(&attr, 0, sizeof(attr))
        attr.qp_state = <v.ibv_qp_state>qp_state
        for key, value in attrs.items():
            if key == "port_num":
                attr.port_num = value
                mask |= v.IBV_QP_PORT
            elif key == "pkey_index":
                attr.pkey_index = value
                mask |= v.IBV_QP_PKEY_INDEX
            elif key == "qp_access_flags":
                attr.qp_access_flags = value
                mask |= v.IBV_QP_ACCESS_FLAGS
            elif key == "path_mtu":
                attr.path_mtu = <v.ibv_mtu><int>value
                mask |= v.IBV_QP_PATH_MTU
            elif key == "dest_qp_num":
                attr.dest_qp_num = value
                mask |= v.IBV_QP_DEST_QPN
            elif key == "rq_psn":
                attr.rq_psn = value
                mask |= v.IBV_QP_RQ_PSN
            elif key == "sq_psn":
                attr.sq_psn = value
                mask |= v.IBV_QP_SQ_PSN
            elif key == "max_rd_atomic":
                attr.max_rd_atomic = value
                mask |= v.IBV_QP_MAX_QP_RD_ATOMIC
            elif key == "max_dest_rd_atomic":
                attr.max_dest_rd_atomic = value
                mask |= v.IBV_QP_MAX_DEST_RD_ATOMIC
            elif key == "min_rnr_timer":
                attr.min_rnr_timer = value
                mask |= v.IBV_QP_MIN_RNR_TIMER
            elif key == "timeout":
                attr.timeout = value
                mask |= v.IBV_QP_TIMEOUT
            elif key == "retry_cnt":
                attr.retry_cnt = value
                mask |= v.IBV_QP_RETRY_CNT
            elif key == "rnr_retry":
                attr.rnr_retry = value
                mask |= v.IBV_QP_RNR_RETRY
            elif key == "ah":
                ah = dict(value)
                attr.ah_attr.dlid = ah.pop("dlid", 0)
                attr.ah_attr.sl = ah.pop("sl", 0)
                attr.ah_attr.src_path_bits = ah.pop("src_path_bits", 0)
                attr.ah_attr.port_num = ah.pop("port_num", 1)
                g = ah.pop("gid", None)
                sgid_index = ah.pop("sgid_index", 0)
                hop_limit = ah.pop("hop_limit", 64)
                traffic_class = ah.pop("traffic_class", 0)
                flow_label = ah.pop("flow_label", 0)
                if ah:
                    raise TypeError(f"unknown address-handle attributes: {sorted(ah)}")
                if g is not None:
                    gid = bytes(g)
                    if len(gid) != 16:
                        raise ValueError(f"a GID is 16 bytes, not {len(gid)}")
                    attr.ah_attr.is_global = 1
                    memcpy(attr.ah_attr.grh.dgid.raw, <const char *>gid, 16)
                    attr.ah_attr.grh.sgid_index = sgid_index
                    attr.ah_attr.grh.hop_limit = hop_limit
                    attr.ah_attr.grh.traffic_class = traffic_class
                    attr.ah_attr.grh.flow_label = flow_label
                mask |= v.IBV_QP_AV
            else:
                raise TypeError(f"QP.modify() got an unknown attribute {key!r}")
        with nogil:
            rc = v.ibv_modify_qp(self._handle, &attr, mask)
        _check_rc(rc, f"ibv_modify_qp(qp {self._handle.qp_num:#x} -> state {qp_state}, "
                      f"attrs {sorted(attrs)})")
        self.state = qp_state

    cdef int _post(self, v.ibv_send_wr *wr) except -1:
        cdef v.ibv_send_wr *bad = NULL
        cdef int rc
        with nogil:
            rc = v.ibv_post_send(self._handle, wr, &bad)
        _check_rc(rc, f"ibv_post_send(qp {self._handle.qp_num:#x}, wr_id {wr.wr_id})")
        return 0

    cdef int _fill(self, v.ibv_send_wr *wr, v.ibv_sge *sge, MR mr, size_t offset, object length,
                   uint64_t wr_id, object imm, bint signaled, object inline) except -1:
        cdef size_t n = 0
        self._alive()
        memset(wr, 0, sizeof(v.ibv_send_wr))
        memset(sge, 0, sizeof(v.ibv_sge))
        if mr is not None:
            _span(mr, offset, length, &n)
        elif length:
            raise ValueError("a non-empty transfer needs an MR")
        if n > 0:
            sge.addr = <uint64_t>(<size_t>mr._handle.addr + offset)
            sge.length = <uint32_t>n
            sge.lkey = mr._handle.lkey
            wr.sg_list = sge
            wr.num_sge = 1
        wr.wr_id = wr_id
        if signaled:
            wr.send_flags |= v.IBV_SEND_SIGNALED
        if inline is None:
            inline = 0 < n <= self._max_inline
        if inline:
            if n > self._max_inline:
                raise ValueError(f"{n} bytes exceed this QP's max_inline_data ({self._max_inline})")
            wr.send_flags |= v.IBV_SEND_INLINE
        if imm is not None:
            wr.imm_data = v.htonl(<uint32_t>imm)
        return 0

    def post_write(self, MR mr, size_t offset, length, uint64_t remote_addr, uint32_t rkey, *,
                   uint64_t wr_id=0, imm=None, bint signaled=True, bint inline=False):
        """RDMA WRITE of mr[offset:offset+length] to remote_addr/rkey; with
        imm (a uint32), RDMA_WRITE_WITH_IMM, which consumes a receive at the
        peer and hands it imm.  mr may be None for a zero-length write.
        inline=True copies the data into the work request (up to
        max_inline_data), so the buffer is reusable once this returns;
        otherwise it must not change until the completion is reaped."""
        cdef v.ibv_send_wr wr
        cdef v.ibv_sge sge
        self._fill(&wr, &sge, mr, offset, length, wr_id, imm, signaled, inline)
        wr.opcode = v.IBV_WR_RDMA_WRITE if imm is None else v.IBV_WR_RDMA_WRITE_WITH_IMM
        wr.wr.rdma.remote_addr = remote_addr
        wr.wr.rdma.rkey = rkey
        return self._post(&wr)

    def post_send(self, MR mr, size_t offset=0, length=None, *, uint64_t wr_id=0, imm=None,
                  bint signaled=True, inline=None):
        """SEND of mr[offset:offset+length] (SEND_WITH_IMM with imm).
        inline=None sends inline whenever the data fits max_inline_data."""
        cdef v.ibv_send_wr wr
        cdef v.ibv_sge sge
        self._fill(&wr, &sge, mr, offset, length, wr_id, imm, signaled, inline)
        wr.opcode = v.IBV_WR_SEND if imm is None else v.IBV_WR_SEND_WITH_IMM
        return self._post(&wr)

    def post_recv(self, MR mr, size_t offset=0, length=None, *, uint64_t wr_id=0):
        """Post a receive into mr[offset:offset+length].  mr=None posts a
        receive with no buffer, enough to take a WRITE_WITH_IMM's immediate."""
        cdef v.ibv_recv_wr wr
        cdef v.ibv_recv_wr *bad = NULL
        cdef v.ibv_sge sge
        cdef size_t n = 0
        cdef int rc
        self._alive()
        memset(&wr, 0, sizeof(wr))
        if mr is not None:
            _span(mr, offset, length, &n)
            sge.addr = <uint64_t>(<size_t>mr._handle.addr + offset)
            sge.length = <uint32_t>n
            sge.lkey = mr._handle.lkey
            wr.sg_list = &sge
            wr.num_sge = 1
        wr.wr_id = wr_id
        with nogil:
            rc = v.ibv_post_recv(self._handle, &wr, &bad)
        _check_rc(rc, f"ibv_post_recv(qp {self._handle.qp_num:#x}, wr_id {wr_id})")

    cpdef close(self):
        """ibv_destroy_qp.  Idempotent."""
        cdef int rc
        if self._handle == NULL:
            return
        if not _forked(self._pid):
            with nogil:
                rc = v.ibv_destroy_qp(self._handle)
            _check_rc(rc, "ibv_destroy_qp")
        self._handle = NULL
        self.pd.qps.discard(self)
        self.send_cq.qps.discard(self)
        self.recv_cq.qps.discard(self)
        self.pd = None
        self.send_cq = None
        self.recv_cq = None

    def __dealloc__(self):
        if self._handle != NULL and not _forked(self._pid):
            v.ibv_destroy_qp(self._handle)
        self._handle = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self._handle == NULL:
            return "<QP closed>"
        return f"<QP {self._handle.qp_num:#x} state={self.state}>"
