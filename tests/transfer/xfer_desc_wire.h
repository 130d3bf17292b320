/* KV descriptors in the production wire format, for the transfer tests and the benchmark: the
 * control plane's protobuf KvDescriptor (node/'s speed_node_kv_desc_to_proto / _from_proto,
 * speed_proto's pack / unpack), the bytes a decode node's Reserve reply carries to a prefill
 * node. Tests ship these bytes between processes (xt_send / xt_recv) exactly as the daemons
 * would, so what they exercise is what production trusts. Linked as speed_xfer_desc_wire.
 *
 * The KvDescriptor message does not carry the descriptor's cookie: a descriptor that made the
 * trip has cookie 0 (the node daemons match notifies by request id). */
#ifndef SPEED_XFER_DESC_WIRE_H
#define SPEED_XFER_DESC_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "kv_transfer.h"
#include "status.h"

/* Packs a descriptor: *buf_p (speed_malloc, caller frees with speed_free) of *len_p bytes.
 * Returns SPEED_OK or the status of the conversion / packing (SPEED_ERR_NO_MEMORY). The
 * descriptor is not checked: tests pack tampered ones. */
speed_status_t xt_desc_pack(const speed_kv_desc_t *desc, uint8_t **buf_p, size_t *len_p);

/* Unpacks bytes from xt_desc_pack (or a daemon) the way a prefill node does: protobuf parse,
 * conversion, speed_kv_desc_check. *desc_p (free with speed_kv_desc_destroy) is set on SPEED_OK
 * only. Returns SPEED_OK, SPEED_ERR_PARSE (not a KvDescriptor), SPEED_ERR_PEER_PROTOCOL (the
 * conversion refused a field: counts or blob sizes past the limits, unknown transport or dtype),
 * SPEED_ERR_FORMAT (speed_kv_desc_check refused it) or SPEED_ERR_NO_MEMORY. */
speed_status_t xt_desc_unpack(const void *buf, size_t len, speed_kv_desc_t **desc_p);

#endif /* SPEED_XFER_DESC_WIRE_H */
