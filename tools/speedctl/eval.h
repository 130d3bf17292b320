/* speedctl eval's parts (cli_eval.c runs them in this order):
 *
 *   eval_data.c    the records: text files cut into windows, JSONL {"text"} / {"ids"} lines
 *   eval_probe.c   the synthetic retrieval records: a pass key hidden in filler text
 *   eval_score.c   each record through the engine at full depth and at every cutoff C
 *                  (shallow prompt as a prefill node runs it, continuation teacher-forced at
 *                  full depth as decode runs it), compared position by position
 *   eval_report.c  the results as a table, as JSON and as an SVG chart
 *
 * A record is prompt + continuation token ids: its first n_prompt ids run at depth C, the next
 * n_cont are the true continuation. Everything here runs on the CLI's one thread; memory is
 * speed_malloc'd and released by the matching cleanup on every path. Errors are printed once
 * (speedctl_fail or the library's log) where they are found. */
#ifndef SPEEDCTL_EVAL_H
#define SPEEDCTL_EVAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine.h"
#include "status.h"
#include "tokenizer.h"

typedef struct {
    int32_t *ids;     /* [n_prompt + n_cont], owned */
    int64_t n_prompt; /* run at depth C */
    int64_t n_cont;   /* teacher-forced at full depth, scored */
    int probe_depth;  /* the probe's depth index; -1 for a data record */
} speedctl_eval_record_t;

typedef struct {
    speedctl_eval_record_t *v;
    size_t n, cap;
    int64_t n_read;    /* records (lines, windows) read, used or not */
    int64_t n_skipped; /* of them, shorter than n_prompt + n_cont tokens */
} speedctl_eval_set_t;

/* Appends a record of ids[0 .. n_prompt + n_cont) (copied). SPEED_OK or SPEED_ERR_NO_MEMORY. */
speed_status_t speedctl_eval_set_add(speedctl_eval_set_t *set, const int32_t *ids, int64_t n_prompt, int64_t n_cont,
                                     int probe_depth);
/* Frees the records; a zeroed set is fine. */
void speedctl_eval_set_cleanup(speedctl_eval_set_t *set);

/* ---- eval_data.c ------------------------------------------------------------------------ */

/* Reads the comma-separated files of `paths`: a file named *.jsonl has one JSON object per line,
 * {"text": "..."} (encoded with the tokenizer's BOS, as a served prompt is) or {"ids": [..]} (as
 * they are); its record is the first n_prompt + n_cont tokens. Any other file is text, encoded
 * whole and cut into consecutive windows of n_prompt + n_cont tokens (the first starts with the
 * BOS). Lines and windows shorter than that are counted in n_skipped. At most max_records
 * records are kept (0 = all). Blank lines are ignored.
 * Returns SPEED_OK; SPEED_ERR_NOT_FOUND / SPEED_ERR_IO (a file); SPEED_ERR_PARSE (a line that is
 * not a JSON object with "text" or "ids", an id outside [0, vocab): named with file:line);
 * SPEED_ERR_NO_MEMORY. On error the set keeps what was added (cleanup frees it). */
speed_status_t speedctl_eval_data_load(const char *paths, const speed_tok_t *tok, int32_t vocab, int64_t n_prompt,
                                       int64_t n_cont, int64_t max_records, speedctl_eval_set_t *set);

/* ---- eval_probe.c ----------------------------------------------------------------------- */

/* The pass-key probe: for each depth d in depths[0..n_depths) (fractions of the filler in
 * [0, 1]) and each of n_trials trials, a record whose prompt is an instruction, filler text of
 * about n_prompt tokens with "The pass key is K. Remember it." after a fraction d of it, and
 * the question "What is the pass key? The pass key is"; its continuation is " K" (K a 5-digit
 * number from seed). A record counts as retrieved when the model's greedy output is exactly the
 * continuation, i.e. every teacher-forced position's top-1 is the true token.
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (n_prompt too small for the text: printed), a
 * tokenizer status, or SPEED_ERR_NO_MEMORY. */
speed_status_t speedctl_eval_probe_build(const speed_tok_t *tok, int64_t n_prompt, const double *depths, int n_depths,
                                         int n_trials, uint64_t seed, speedctl_eval_set_t *set);

/* ---- eval_score.c ----------------------------------------------------------------------- */

#define SPEEDCTL_EVAL_MAX_CUTOFFS 64
#define SPEEDCTL_EVAL_MAX_DEPTHS  16

/* What one cutoff gathered over the records. */
typedef struct {
    int prefill_layers;  /* C */
    double *kl;          /* [n_pos] KL(full || C) per scored position, nats */
    int64_t n_pos, cap;  /* continuation positions scored */
    int64_t n_top1_same; /* positions where C's top-1 is full depth's */
    double nll_sum;      /* sum of -log p_C(true token) */
    int64_t probe_hits[SPEEDCTL_EVAL_MAX_DEPTHS], probe_n[SPEEDCTL_EVAL_MAX_DEPTHS];
} speedctl_eval_acc_t;

void speedctl_eval_acc_cleanup(speedctl_eval_acc_t *acc);

typedef struct {
    speed_engine_t *engine;    /* its max_seqs bounds the sequences in flight */
    int n_layers;              /* L */
    speed_engine_t *reference; /* NULL: full depth of `engine` is the reference; else a second model's
                                 * engine (same vocabulary), run at its full depth (reference_layers) */
    int reference_layers;      /* the reference model's L */
    int reference_max_seqs;    /* its max_seqs */
    int anchors, tail;         /* A, T of every cutoff */
    int max_seqs;              /* the engine's max_seqs */
    const char *what;          /* progress bar label ("records", "probe") */
    bool progress;             /* draw a progress bar on stderr */
} speedctl_eval_run_t;

/* Runs every record of `set` at full depth and at each accs[i].prefill_layers (the caller sets
 * them, 1..L; L itself is allowed and is the full-depth run), as many sequences per engine
 * step as max_seqs allows, and adds to accs[i]: for data records KL(full || C) of every
 * continuation position, top-1 agreement with full depth and the true continuation's NLL; for
 * probe records (probe_depth >= 0) only whether the continuation was retrieved. With
 * run->reference, "full" is the reference model at its full depth instead (so C = L of the
 * model under test is compared too: how far a tuned model's own full depth moved from its base).
 * Returns SPEED_OK, the engine's status (logged there) or SPEED_ERR_NO_MEMORY. The engine has no
 * sequences left on return. */
speed_status_t speedctl_eval_score(const speedctl_eval_run_t *run, const speedctl_eval_set_t *set,
                                   speedctl_eval_acc_t *accs, int n_accs);

/* ---- eval_report.c ---------------------------------------------------------------------- */

/* One cutoff's numbers, as reported. */
typedef struct {
    int prefill_layers;
    int64_t n_pos;
    double kl_mean, kl_p90;               /* p90: the nearest-rank 90th percentile, sorted[ceil(0.9 n) - 1] */
    double top1_agreement;                /* fraction of positions */
    double perplexity;                    /* exp(mean NLL of the true continuation) */
    size_t kv_bytes, kv_bytes_full_depth; /* of one n_prompt-token prompt, cache dtype */
    double kv_saved;                      /* 1 - kv_bytes / kv_bytes_full_depth */
    double prefill_flops, prefill_flops_full_depth, prefill_flops_saved;
    double probe_accuracy[SPEEDCTL_EVAL_MAX_DEPTHS]; /* per probe depth; -1 when not run */
    double probe_overall;
} speedctl_eval_result_t;

/* The result of an accumulator (sorts acc->kl). Empty accumulators give zeros (perplexity 0). */
void speedctl_eval_result_of(speedctl_eval_acc_t *acc, speedctl_eval_result_t *res);

typedef struct {
    const char *model;
    const char *reference_model; /* NULL: the model's own full depth */
    int n_layers;
    const char *kv_dtype;
    int64_t n_prompt, n_cont;
    int anchors, tail;
    const speedctl_eval_set_t *data;  /* NULL: no --data */
    const speedctl_eval_set_t *probe; /* NULL: no --probe */
    const double *probe_depths;
    int n_probe_depths, probe_trials;
    const speedctl_eval_result_t *results;
    int n_results;
    double seconds;
} speedctl_eval_report_t;

/* The table (and the probe's) on stdout. */
void speedctl_eval_table_print(const speedctl_eval_report_t *r);
/* One JSON object on stdout (docs/speedctl.md, ## eval). Returns false when out of memory. */
bool speedctl_eval_json_print(const speedctl_eval_report_t *r);
/* The chart: mean and p90 KL against C on the left axis, top-1 agreement, KV saved and prefill
 * FLOPs saved in percent on the right. Returns SPEED_OK or SPEED_ERR_IO (printed). */
speed_status_t speedctl_eval_svg_write(const speedctl_eval_report_t *r, const char *path);

#endif /* SPEEDCTL_EVAL_H */
