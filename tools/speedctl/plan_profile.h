/* The profile `speedctl profile` writes and `speedctl plan` reads: one node's measured costs on
 * one backend. JSON (docs/operations.md, "The profile"):
 *
 *   {"schema": "speedserve-profile/1",
 *    "model": {"path": DIR, "layers": L, "kv_bytes_per_token_layer": K+V bytes of one token in
 *              one layer, "kv_dtype": "bf16"},
 *    "backend": "cpu", "threads": 1, "tensor_parallel": 1,
 *    "engine": {"max_step_tokens": 512, "prefill_chunk": 512}, "repeat": 5,
 *    "transport": "ucx shm, checked writes, in process",
 *    "depths": [{"prefill_layers": C,
 *                "prefill":  [{"tokens": n, "ms": t}, ...],          one prompt alone, chunked
 *                "decode":   [{"batch": b, "context": n, "ms": t}, ...],  one step of b sequences
 *                "transfer": [{"bytes": n, "ms": t}, ...]}, ...]}       one whole KV transfer
 *
 * Times are medians, in milliseconds. Lookups interpolate linearly between measured points and
 * extrapolate linearly past the last two (prefill, transfer) or clamp (decode context).
 *
 * Not thread-safe objects: plain data, one owner. */
#ifndef SPEED_PLAN_PROFILE_H
#define SPEED_PLAN_PROFILE_H

#include <stddef.h>

#include "status.h"

#define SPEED_PLAN_MAX_CUTOFFS 16
#define SPEED_PLAN_MAX_POINTS  64

typedef struct {
    double x;  /* tokens (prefill) or bytes (transfer) */
    double ms; /* median */
} speed_plan_point_t;

typedef struct {
    int batch;
    double context; /* prompt tokens of each sequence of the batch */
    double ms;      /* one decode step */
} speed_plan_decode_point_t;

typedef struct {
    int prefill_layers; /* C, resolved (1..L) */
    speed_plan_point_t prefill[SPEED_PLAN_MAX_POINTS];
    int n_prefill;
    speed_plan_decode_point_t decode[SPEED_PLAN_MAX_POINTS * 4];
    int n_decode;
    speed_plan_point_t transfer[SPEED_PLAN_MAX_POINTS]; /* may be empty: transfer costs nothing */
    int n_transfer;
} speed_plan_depth_t;

typedef struct {
    char model[512];
    int n_layers;
    double kv_bytes_per_token_layer;
    char kv_dtype[16];
    char backend[16];
    int threads, tensor_parallel;
    int max_step_tokens, prefill_chunk, repeat;
    char transport[64];
    speed_plan_depth_t depths[SPEED_PLAN_MAX_CUTOFFS];
    int n_depths;
} speed_plan_profile_t;

/* Reads and checks a profile file (every field present, in range, points sorted by their x
 * and positive times). On error the reason, naming the file and the field, goes into err:
 * SPEED_ERR_IO (unreadable), SPEED_ERR_INVALID_ARGUMENT (not JSON, wrong schema, a field
 * missing or out of range). */
speed_status_t speed_plan_profile_load(const char *path, speed_plan_profile_t *prof, char *err, size_t err_size);

/* The same from a string (tests); `what` names it in errors. */
speed_status_t speed_plan_profile_parse(const char *text, const char *what, speed_plan_profile_t *prof, char *err,
                                        size_t err_size);

/* Writes the profile as JSON to path (NULL: stdout). SPEED_ERR_IO with the reason in err. */
speed_status_t speed_plan_profile_save(const speed_plan_profile_t *prof, const char *path, char *err, size_t err_size);

/* The depth entry of cutoff C, or NULL. */
const speed_plan_depth_t *speed_plan_profile_depth(const speed_plan_profile_t *prof, int prefill_layers);

/* Milliseconds of a prefill step of `rows` prompt rows at this depth. */
double speed_plan_prefill_ms(const speed_plan_depth_t *d, double rows);
/* Milliseconds of a decode step of `batch` sequences of mean context `context`. */
double speed_plan_decode_ms(const speed_plan_depth_t *d, double batch, double context);
/* Milliseconds of a KV transfer of `bytes` (0 without transfer points). */
double speed_plan_transfer_ms(const speed_plan_depth_t *d, double bytes);

#endif /* SPEED_PLAN_PROFILE_H */
