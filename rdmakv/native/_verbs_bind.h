/*
 * Versioned binding of the libibverbs functions rdmakv calls.
 *
 * The extension is not linked against libibverbs (so the TCP path imports
 * where rdma-core is absent); rdmakv/_native.py loads libibverbs.so.1 with
 * RTLD_GLOBAL first.  A plain undefined reference from an object without
 * version information is bound by glibc to the *oldest* version of a
 * symbol, which for libibverbs is the IBVERBS_1.0 compatibility ABI
 * (ibv_open_device@IBVERBS_1.0 returns an ibv_context_1_0, and newer entry
 * points such as _ibv_query_gid_ex then crash on it).  So every library
 * function is looked up here with dlvsym() at the version rdma-core
 * documents as current, and called through these pointers.  The static
 * inline verbs (ibv_post_send, ibv_post_recv, ibv_poll_cq,
 * ibv_req_notify_cq) go through the context's ops table and need no symbol.
 *
 * Included by exactly one translation unit (_transport.c), after Python.h,
 * which defines _GNU_SOURCE (needed for dlvsym and RTLD_DEFAULT).
 */
#ifndef RDMAKV_VERBS_BIND_H
#define RDMAKV_VERBS_BIND_H

#include <dlfcn.h>
#include <errno.h>
#include <string.h>
#include <infiniband/verbs.h>

#define RDMAKV_VERBS_FUNCS(X)                                                            \
    X(IBVERBS_1.1, struct ibv_device **, ibv_get_device_list, (int *))                   \
    X(IBVERBS_1.1, void, ibv_free_device_list, (struct ibv_device **))                   \
    X(IBVERBS_1.1, const char *, ibv_get_device_name, (struct ibv_device *))             \
    X(IBVERBS_1.1, struct ibv_context *, ibv_open_device, (struct ibv_device *))         \
    X(IBVERBS_1.1, int, ibv_close_device, (struct ibv_context *))                        \
    X(IBVERBS_1.1, int, ibv_query_device, (struct ibv_context *, struct ibv_device_attr *)) \
    X(IBVERBS_1.1, int, ibv_query_port,                                                  \
      (struct ibv_context *, uint8_t, struct _compat_ibv_port_attr *))                   \
    X(IBVERBS_1.1, int, ibv_query_gid, (struct ibv_context *, uint8_t, int, union ibv_gid *)) \
    X(IBVERBS_1.1, struct ibv_pd *, ibv_alloc_pd, (struct ibv_context *))                \
    X(IBVERBS_1.1, int, ibv_dealloc_pd, (struct ibv_pd *))                               \
    X(IBVERBS_1.1, struct ibv_mr *, ibv_reg_mr, (struct ibv_pd *, void *, size_t, int))  \
    X(IBVERBS_1.1, int, ibv_dereg_mr, (struct ibv_mr *))                                 \
    X(IBVERBS_1.0, struct ibv_comp_channel *, ibv_create_comp_channel, (struct ibv_context *)) \
    X(IBVERBS_1.0, int, ibv_destroy_comp_channel, (struct ibv_comp_channel *))           \
    X(IBVERBS_1.1, struct ibv_cq *, ibv_create_cq,                                       \
      (struct ibv_context *, int, void *, struct ibv_comp_channel *, int))               \
    X(IBVERBS_1.1, int, ibv_destroy_cq, (struct ibv_cq *))                               \
    X(IBVERBS_1.1, int, ibv_get_cq_event, (struct ibv_comp_channel *, struct ibv_cq **, void **)) \
    X(IBVERBS_1.1, void, ibv_ack_cq_events, (struct ibv_cq *, unsigned int))             \
    X(IBVERBS_1.1, struct ibv_qp *, ibv_create_qp, (struct ibv_pd *, struct ibv_qp_init_attr *)) \
    X(IBVERBS_1.1, int, ibv_modify_qp, (struct ibv_qp *, struct ibv_qp_attr *, int))     \
    X(IBVERBS_1.1, int, ibv_destroy_qp, (struct ibv_qp *))                               \
    X(IBVERBS_1.1, int, ibv_fork_init, (void))                                           \
    X(IBVERBS_1.1, const char *, ibv_wc_status_str, (enum ibv_wc_status))

/* Newer entry points: absent from old rdma-core; callers check for NULL. */
#define RDMAKV_VERBS_OPTIONAL(X)                                                         \
    X(IBVERBS_1.11, int, _ibv_query_gid_ex,                                              \
      (struct ibv_context *, uint32_t, uint32_t, struct ibv_gid_entry *, uint32_t, size_t)) \
    X(IBVERBS_1.13, enum ibv_fork_status, ibv_is_fork_initialized, (void))

#define RDMAKV_DECLARE(ver, ret, name, args) static ret (*rdmakv_p_##name) args = NULL;
RDMAKV_VERBS_FUNCS(RDMAKV_DECLARE)
RDMAKV_VERBS_OPTIONAL(RDMAKV_DECLARE)
#undef RDMAKV_DECLARE

/* Bind every function; returns NULL, or the name of the first required
 * function that libibverbs (in the global scope) does not provide. */
static const char *rdmakv_verbs_bind(void)
{
#define RDMAKV_BIND(ver, ret, name, args)                                                \
    rdmakv_p_##name = (ret (*) args)dlvsym(RTLD_DEFAULT, #name, #ver);                  \
    if (rdmakv_p_##name == NULL)                                                         \
        return #name "@" #ver;
#define RDMAKV_BIND_OPTIONAL(ver, ret, name, args)                                       \
    rdmakv_p_##name = (ret (*) args)dlvsym(RTLD_DEFAULT, #name, #ver);
    RDMAKV_VERBS_OPTIONAL(RDMAKV_BIND_OPTIONAL)
    RDMAKV_VERBS_FUNCS(RDMAKV_BIND)
#undef RDMAKV_BIND
#undef RDMAKV_BIND_OPTIONAL
    return NULL;
}

/* ibv_query_port: the provider's extended query when it has one (it fills
 * the whole current struct), else the library's IBVERBS_1.1 entry. */
static inline int rdmakv_query_port(struct ibv_context *ctx, uint8_t port,
                                    struct ibv_port_attr *attr)
{
    struct verbs_context *vctx = verbs_get_ctx_op(ctx, query_port);

    memset(attr, 0, sizeof(*attr));
    if (vctx)
        return vctx->query_port(ctx, port, attr, sizeof(*attr));
    return rdmakv_p_ibv_query_port(ctx, port, (struct _compat_ibv_port_attr *)attr);
}

static inline int rdmakv_query_gid_ex(struct ibv_context *ctx, uint32_t port, uint32_t index,
                                      struct ibv_gid_entry *entry)
{
    if (rdmakv_p__ibv_query_gid_ex == NULL)
        return EOPNOTSUPP;
    return rdmakv_p__ibv_query_gid_ex(ctx, port, index, entry, 0, sizeof(*entry));
}

static inline int rdmakv_is_fork_initialized(void)
{
    if (rdmakv_p_ibv_is_fork_initialized == NULL)
        return -1;
    return (int)rdmakv_p_ibv_is_fork_initialized();
}

#endif
