/* SPEED depth: the cutoff C, the anchors A and the tail T of a sequence (docs/design.md §1).
 *
 * A model has L layers. A sequence's prompt positions [0, A) are anchors, [A, n-T) shallow and
 * [n-T, n) its tail; anchors, tail and generated tokens run all L layers, shallow tokens only the
 * lower C. C = L is the standard model (SPEED off).
 *
 * C has one name everywhere: the cutoff C in prose, `prefill_layers` in code, on the wire and in
 * config. A client or an operator states it as a layer count ("24") or as a fraction of L
 * ("0.75": rounded to the nearest layer, halves up, at least 1). This module is the only place
 * that parses a stated cutoff and the only place that resolves one against a model:
 *
 *   speed_cutoff_parse     text -> speed_cutoff_t             (command lines, config files)
 *   speed_depth_resolve    request over a default, for L      (router, nodes, batcher, engine,
 *                          -> speed_depth_t with C in 1..L     speedctl)
 *
 * so the router, both nodes and speedctl give the same C, or the same error, for a value.
 * Everything here is pure: no allocation, no logging, safe from any thread. */
#ifndef SPEED_DEPTH_H
#define SPEED_DEPTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* A resolved depth: what a sequence runs at. */
typedef struct {
    int prefill_layers; /* C: layers that see every prompt token, 1..L (0 = L, SPEED off, only
                         * in speed_depth_default() and engine params not yet resolved) */
    int anchors;        /* A >= 0: first prompt tokens kept at full depth */
    int tail;           /* T >= 1: last prompt tokens kept at full depth (the last one makes the
                         * first output token, so it must be full depth) */
} speed_depth_t;

/* {C = L, A = 1, T = 1}: SPEED off, with the paper's anchors and tail. */
speed_depth_t speed_depth_default(void);

/* How a cutoff was stated. */
typedef enum {
    SPEED_CUTOFF_UNSET = 0, /* not given: the default applies */
    SPEED_CUTOFF_LAYERS,    /* a layer count; valid in 1..L */
    SPEED_CUTOFF_FRACTION,  /* a fraction of L; valid in (0, 1] */
} speed_cutoff_kind_t;

/* A cutoff as stated, before it meets a model. Zero-initialised = unset. */
typedef struct {
    speed_cutoff_kind_t kind;
    int64_t layers;  /* SPEED_CUTOFF_LAYERS: the count as given (range checked at resolve) */
    double fraction; /* SPEED_CUTOFF_FRACTION: the fraction as given (range checked at resolve) */
} speed_cutoff_t;

/* A cutoff stated as a layer count / as a fraction of L (not range checked here). */
speed_cutoff_t speed_cutoff_layers(int64_t layers);
speed_cutoff_t speed_cutoff_fraction(double fraction);

/* Parses a stated cutoff: digits are a layer count ("24"), digits with one decimal point a
 * fraction ("0.75", "1.0", ".5"), either with an optional leading '-' (as in JSON, so a value reads
 * the same on a command line as in a request); NULL or "" is SPEED_CUTOFF_UNSET. Ranges are not
 * checked here (speed_depth_resolve does, against L): "40", "-1" and "1.5" parse.
 * Returns SPEED_OK, or SPEED_ERR_INVALID_ARGUMENT with a one-line reason in err (when err_size
 * > 0) for anything else ("abc", "1e3", "0.7x", a count beyond int64). */
speed_status_t speed_cutoff_parse(const char *text, speed_cutoff_t *cutoff_p, char *err, size_t err_size);

/* Writes the cutoff as it was stated ("24", "0.75", "default") into buf; returns buf. */
const char *speed_cutoff_str(speed_cutoff_t cutoff, char *buf, size_t buf_size);

/* A depth as a request (or a deployment's config) states it: each part may be left unset. */
typedef struct {
    speed_cutoff_t prefill_layers; /* unset: the default's C */
    bool has_anchors;              /* false: the default's A */
    int64_t anchors;
    bool has_tail; /* false: the default's T */
    int64_t tail;
} speed_depth_request_t;

/* The request that states exactly `depth` (C 0 = unset). */
speed_depth_request_t speed_depth_request_of(speed_depth_t depth);

/* THE resolution of a depth. Each part of `request` (NULL = nothing stated) that is set wins over
 * `deflt` (NULL = speed_depth_default(); its C 0 means L). C: a count must lie in 1..n_layers
 * (never clamped); a fraction f in (0, 1] gives floor(f * L + 0.5), at least 1. A must be >= 0
 * and T >= 1 (their upper bounds depend on the context limit: the engine checks those).
 * Returns SPEED_OK with *depth_p = the resolved depth (C in 1..L), or SPEED_ERR_INVALID_ARGUMENT
 * with a one-line reason in err (naming prefill_layers, anchors or tail and the valid range;
 * the same text for the same value wherever it is resolved) and *depth_p untouched; n_layers < 1
 * or a default out of range is SPEED_ERR_INVALID_ARGUMENT too. */
speed_status_t speed_depth_resolve(const speed_depth_request_t *request, const speed_depth_t *deflt, int n_layers,
                                   speed_depth_t *depth_p, char *err, size_t err_size);

/* Which part of a depth a refusal of speed_depth_resolve is about: "prefill_layers", "anchors"
 * or "tail" (its reason starts with that name; anything else, e.g. a bad default, is
 * "prefill_layers"). For callers that name the part in their own terms: the router's param
 * ("speed.tail"), speedctl's option ("--tail"). */
const char *speed_depth_error_part(const char *reason);

#endif /* SPEED_DEPTH_H */
