# libibverbs declarations: only what rdmakv/_verbs.pxi calls, written from
# <infiniband/verbs.h> (rdma-core 44).  Types and the static inline verbs
# (ibv_post_send, ibv_post_recv, ibv_poll_cq, ibv_req_notify_cq: they call
# through the context's ops table) come from the header; every exported
# library function is reached through _verbs_bind.h instead.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<infiniband/verbs.h>" nogil:

    # --- enums (only the members we use) -------------------------------------
    enum ibv_fork_status:
        IBV_FORK_DISABLED
        IBV_FORK_ENABLED
        IBV_FORK_UNNEEDED

    enum ibv_gid_type:
        IBV_GID_TYPE_IB
        IBV_GID_TYPE_ROCE_V1
        IBV_GID_TYPE_ROCE_V2

    enum ibv_mtu:
        IBV_MTU_256
        IBV_MTU_512
        IBV_MTU_1024
        IBV_MTU_2048
        IBV_MTU_4096

    enum ibv_port_state:
        IBV_PORT_NOP
        IBV_PORT_DOWN
        IBV_PORT_INIT
        IBV_PORT_ARMED
        IBV_PORT_ACTIVE
        IBV_PORT_ACTIVE_DEFER

    enum:
        IBV_LINK_LAYER_UNSPECIFIED
        IBV_LINK_LAYER_INFINIBAND
        IBV_LINK_LAYER_ETHERNET

    enum ibv_access_flags:
        IBV_ACCESS_LOCAL_WRITE
        IBV_ACCESS_REMOTE_WRITE
        IBV_ACCESS_REMOTE_READ
        IBV_ACCESS_REMOTE_ATOMIC

    enum ibv_qp_type:
        IBV_QPT_RC
        IBV_QPT_UC
        IBV_QPT_UD

    enum ibv_qp_state:
        IBV_QPS_RESET
        IBV_QPS_INIT
        IBV_QPS_RTR
        IBV_QPS_RTS
        IBV_QPS_SQD
        IBV_QPS_SQE
        IBV_QPS_ERR

    enum ibv_qp_attr_mask:
        IBV_QP_STATE
        IBV_QP_ACCESS_FLAGS
        IBV_QP_PKEY_INDEX
        IBV_QP_PORT
        IBV_QP_AV
        IBV_QP_PATH_MTU
        IBV_QP_TIMEOUT
        IBV_QP_RETRY_CNT
        IBV_QP_RNR_RETRY
        IBV_QP_RQ_PSN
        IBV_QP_MAX_QP_RD_ATOMIC
        IBV_QP_MIN_RNR_TIMER
        IBV_QP_SQ_PSN
        IBV_QP_MAX_DEST_RD_ATOMIC
        IBV_QP_DEST_QPN

    enum ibv_wr_opcode:
        IBV_WR_RDMA_WRITE
        IBV_WR_RDMA_WRITE_WITH_IMM
        IBV_WR_SEND
        IBV_WR_SEND_WITH_IMM
        IBV_WR_RDMA_READ

    enum ibv_send_flags:
        IBV_SEND_FENCE
        IBV_SEND_SIGNALED
        IBV_SEND_SOLICITED
        IBV_SEND_INLINE

    enum ibv_wc_status:
        IBV_WC_SUCCESS

    enum ibv_wc_opcode:
        IBV_WC_SEND
        IBV_WC_RDMA_WRITE
        IBV_WC_RDMA_READ
        IBV_WC_RECV
        IBV_WC_RECV_RDMA_WITH_IMM

    enum ibv_wc_flags:
        IBV_WC_GRH
        IBV_WC_WITH_IMM

    # --- device discovery -----------------------------------------------------
    struct ibv_device:
        char name[64]

    struct ibv_context:
        ibv_device *device
        int cmd_fd
        int async_fd
        int num_comp_vectors



    struct ibv_device_attr:
        char fw_ver[64]
        uint64_t node_guid          # __be64
        uint64_t sys_image_guid     # __be64
        uint64_t max_mr_size
        uint32_t vendor_id
        uint32_t vendor_part_id
        uint32_t hw_ver
        int max_qp
        int max_qp_wr
        int max_sge
        int max_cq
        int max_cqe
        int max_mr
        int max_pd
        int max_qp_rd_atom
        int max_qp_init_rd_atom
        uint8_t phys_port_cnt


    struct ibv_port_attr:
        ibv_port_state state
        ibv_mtu max_mtu
        ibv_mtu active_mtu
        int gid_tbl_len
        uint32_t max_msg_sz
        uint16_t lid
        uint16_t sm_lid
        uint8_t active_width
        uint8_t active_speed
        uint8_t phys_state
        uint8_t link_layer


    union ibv_gid:
        uint8_t raw[16]

    struct ibv_gid_entry:
        ibv_gid gid
        uint32_t gid_index
        uint32_t port_num
        uint32_t gid_type
        uint32_t ndev_ifindex


    # --- protection domain and memory registration ----------------------------
    struct ibv_pd:
        ibv_context *context
        uint32_t handle


    struct ibv_mr:
        ibv_context *context
        ibv_pd *pd
        void *addr
        size_t length
        uint32_t handle
        uint32_t lkey
        uint32_t rkey


    # --- completion channels and queues ---------------------------------------
    struct ibv_comp_channel:
        ibv_context *context
        int fd


    struct ibv_cq:
        ibv_context *context
        ibv_comp_channel *channel
        int cqe

    int ibv_req_notify_cq(ibv_cq *cq, int solicited_only)

    struct ibv_wc:
        uint64_t wr_id
        ibv_wc_status status
        ibv_wc_opcode opcode
        uint32_t vendor_err
        uint32_t byte_len
        uint32_t imm_data           # __be32, in an anonymous union
        uint32_t qp_num
        uint32_t src_qp
        unsigned int wc_flags

    int ibv_poll_cq(ibv_cq *cq, int num_entries, ibv_wc *wc)

    # --- queue pairs ----------------------------------------------------------
    struct ibv_qp_cap:
        uint32_t max_send_wr
        uint32_t max_recv_wr
        uint32_t max_send_sge
        uint32_t max_recv_sge
        uint32_t max_inline_data

    struct ibv_qp_init_attr:
        void *qp_context
        ibv_cq *send_cq
        ibv_cq *recv_cq
        void *srq
        ibv_qp_cap cap
        ibv_qp_type qp_type
        int sq_sig_all

    struct ibv_qp:
        ibv_context *context
        ibv_pd *pd
        uint32_t qp_num
        ibv_qp_state state

    struct ibv_global_route:
        ibv_gid dgid
        uint32_t flow_label
        uint8_t sgid_index
        uint8_t hop_limit
        uint8_t traffic_class

    struct ibv_ah_attr:
        ibv_global_route grh
        uint16_t dlid
        uint8_t sl
        uint8_t src_path_bits
        uint8_t static_rate
        uint8_t is_global
        uint8_t port_num

    struct ibv_qp_attr:
        ibv_qp_state qp_state
        ibv_mtu path_mtu
        uint32_t qkey
        uint32_t rq_psn
        uint32_t sq_psn
        uint32_t dest_qp_num
        unsigned int qp_access_flags
        ibv_qp_cap cap
        ibv_ah_attr ah_attr
        uint16_t pkey_index
        uint8_t max_rd_atomic
        uint8_t max_dest_rd_atomic
        uint8_t min_rnr_timer
        uint8_t port_num
        uint8_t timeout
        uint8_t retry_cnt
        uint8_t rnr_retry


    struct ibv_sge:
        uint64_t addr
        uint32_t length
        uint32_t lkey

    # wr.rdma is a member of an anonymous union in the header; Cython only
    # needs the member names to emit `wr.wr.rdma.remote_addr`.
    struct _ibv_send_wr_rdma:
        uint64_t remote_addr
        uint32_t rkey

    union _ibv_send_wr_wr:
        _ibv_send_wr_rdma rdma

    struct ibv_send_wr:
        uint64_t wr_id
        ibv_send_wr *next
        ibv_sge *sg_list
        int num_sge
        ibv_wr_opcode opcode
        unsigned int send_flags
        uint32_t imm_data           # __be32, in an anonymous union
        _ibv_send_wr_wr wr

    struct ibv_recv_wr:
        uint64_t wr_id
        ibv_recv_wr *next
        ibv_sge *sg_list
        int num_sge

    int ibv_post_send(ibv_qp *qp, ibv_send_wr *wr, ibv_send_wr **bad_wr)
    int ibv_post_recv(ibv_qp *qp, ibv_recv_wr *wr, ibv_recv_wr **bad_wr)


# Library functions, called through pointers bound at the right symbol
# version by _verbs_bind.h (see the comment there for why).
cdef extern from "_verbs_bind.h" nogil:
    const char *rdmakv_verbs_bind()
    ibv_device **ibv_get_device_list "rdmakv_p_ibv_get_device_list"(int *num_devices)
    void ibv_free_device_list "rdmakv_p_ibv_free_device_list"(ibv_device **list)
    const char *ibv_get_device_name "rdmakv_p_ibv_get_device_name"(ibv_device *device)
    ibv_context *ibv_open_device "rdmakv_p_ibv_open_device"(ibv_device *device)
    int ibv_close_device "rdmakv_p_ibv_close_device"(ibv_context *context)
    int ibv_fork_init "rdmakv_p_ibv_fork_init"()
    int ibv_query_device "rdmakv_p_ibv_query_device"(ibv_context *context, ibv_device_attr *device_attr)
    int ibv_query_gid "rdmakv_p_ibv_query_gid"(ibv_context *context, uint8_t port_num, int index, ibv_gid *gid)
    ibv_pd *ibv_alloc_pd "rdmakv_p_ibv_alloc_pd"(ibv_context *context)
    int ibv_dealloc_pd "rdmakv_p_ibv_dealloc_pd"(ibv_pd *pd)
    ibv_mr *ibv_reg_mr "rdmakv_p_ibv_reg_mr"(ibv_pd *pd, void *addr, size_t length, int access)
    int ibv_dereg_mr "rdmakv_p_ibv_dereg_mr"(ibv_mr *mr)
    ibv_comp_channel *ibv_create_comp_channel "rdmakv_p_ibv_create_comp_channel"(ibv_context *context)
    int ibv_destroy_comp_channel "rdmakv_p_ibv_destroy_comp_channel"(ibv_comp_channel *channel)
    ibv_cq *ibv_create_cq "rdmakv_p_ibv_create_cq"(ibv_context *context, int cqe, void *cq_context,
                          ibv_comp_channel *channel, int comp_vector)
    int ibv_destroy_cq "rdmakv_p_ibv_destroy_cq"(ibv_cq *cq)
    int ibv_get_cq_event "rdmakv_p_ibv_get_cq_event"(ibv_comp_channel *channel, ibv_cq **cq, void **cq_context)
    void ibv_ack_cq_events "rdmakv_p_ibv_ack_cq_events"(ibv_cq *cq, unsigned int nevents)
    const char *ibv_wc_status_str "rdmakv_p_ibv_wc_status_str"(ibv_wc_status status)
    ibv_qp *ibv_create_qp "rdmakv_p_ibv_create_qp"(ibv_pd *pd, ibv_qp_init_attr *qp_init_attr)
    int ibv_modify_qp "rdmakv_p_ibv_modify_qp"(ibv_qp *qp, ibv_qp_attr *attr, int attr_mask)
    int ibv_destroy_qp "rdmakv_p_ibv_destroy_qp"(ibv_qp *qp)
    int rdmakv_query_port(ibv_context *context, uint8_t port_num, ibv_port_attr *port_attr)
    int rdmakv_query_gid_ex(ibv_context *context, uint32_t port_num, uint32_t gid_index,
                            ibv_gid_entry *entry)
    int rdmakv_is_fork_initialized()


cdef extern from "<arpa/inet.h>" nogil:
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)
