/* gRPC method paths of the speedserve control plane (package speed.v1, speed.proto).
 *
 * The path is what goes on the wire (":path" header) and what common/rpc registers; it must
 * match exactly, leading '/' included. Kind: U = unary, S = server streaming (the server
 * sends any number of messages, then a status).
 */
#ifndef SPEED_METHODS_H
#define SPEED_METHODS_H

/* Decode node */
#define SPEED_METHOD_DECODE_RESERVE  "/speed.v1.Decode/Reserve"  /* U ReserveRequest  -> ReserveReply */
#define SPEED_METHOD_DECODE_GENERATE "/speed.v1.Decode/Generate" /* S GenerateRequest -> GenerateEvent* */
#define SPEED_METHOD_DECODE_CANCEL   "/speed.v1.Decode/Cancel"   /* U CancelRequest   -> CancelReply */

/* Prefill node */
#define SPEED_METHOD_PREFILL_PREFILL "/speed.v1.Prefill/Prefill" /* U PrefillRequest  -> PrefillReply */
#define SPEED_METHOD_PREFILL_CANCEL  "/speed.v1.Prefill/Cancel"  /* U CancelRequest   -> CancelReply */

/* Every node */
#define SPEED_METHOD_NODE_HEALTH "/speed.v1.Node/Health" /* U HealthRequest     -> HealthReply */
#define SPEED_METHOD_NODE_DRAIN  "/speed.v1.Node/Drain"  /* U DrainRequest      -> DrainReply */
#define SPEED_METHOD_NODE_STATUS "/speed.v1.Node/Status" /* U NodeStatusRequest -> NodeStatus */

#endif /* SPEED_METHODS_H */
