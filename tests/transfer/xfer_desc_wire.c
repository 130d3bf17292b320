/* KV descriptors in the production wire format (xfer_desc_wire.h). */
#include "xfer_desc_wire.h"

#include "node.h"
#include "speed_proto.h"

speed_status_t xt_desc_pack(const speed_kv_desc_t *desc, uint8_t **buf_p, size_t *len_p) {
    Speed__V1__KvDescriptor kd;
    speed_status_t st = speed_node_kv_desc_to_proto(desc, NULL, &kd); /* cleans up after itself on error */
    if (st != SPEED_OK) return st;
    st = speed_proto_pack(&kd.base, buf_p, len_p);
    speed_node_kv_desc_proto_cleanup(&kd);
    return st;
}

speed_status_t xt_desc_unpack(const void *buf, size_t len, speed_kv_desc_t **desc_p) {
    Speed__V1__KvDescriptor *kd = NULL;
    speed_status_t st = speed_proto_unpack(&speed__v1__kv_descriptor__descriptor, buf, len, (ProtobufCMessage **)&kd);
    if (st != SPEED_OK) return st;
    speed_kv_desc_t *d = NULL;
    st = speed_node_kv_desc_from_proto(kd, &d);
    speed_proto_free(&kd->base);
    if (st == SPEED_OK) *desc_p = d;
    return st;
}
