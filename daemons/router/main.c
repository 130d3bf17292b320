/* speed-router: the OpenAI-compatible front door of a speedserve cluster.
 *
 *   speed-router --config cluster.yaml [--model DIR] [--router.port N] ...
 *
 * Lifecycle (docs/design.md §7): load config, tokenizer and model shape → start (node poll,
 * HTTP) → wait for SIGTERM/SIGINT → drain (health 503, no new requests, in-flight requests
 * finish within the grace period) → cancel what is left → stop HTTP, then gRPC → exit 0.
 * A second signal exits at once. Signals are blocked in every thread and taken by sigwait in
 * the main thread, so no handler runs in a library's thread. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "alloc.h"
#include "clock.h"
#include "cluster_config.h"
#include "log.h"
#include "router.h"
#include "signals.h"
#include "tokenizer.h"

/* Requests in flight at SIGTERM get this long to finish (or request_timeout_ms if shorter). */
#define SPEED_ROUTER_DRAIN_GRACE_MS 30000

#define EXIT_USAGE 2

/* The model's depth and context from config.json (the router never loads weights). */
static speed_status_t read_model_shape(const char *dir, int32_t *n_layers_p, int64_t *n_ctx_p) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    json_error_t jerr;
    memset(&jerr, 0, sizeof jerr);
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s (line %d)", path, jerr.text, jerr.line);
        return access(path, R_OK) == 0 ? SPEED_ERR_PARSE : SPEED_ERR_NOT_FOUND;
    }
    json_t *layers = json_object_get(root, "num_hidden_layers");
    json_t *ctx = json_object_get(root, "max_position_embeddings");
    speed_status_t st = SPEED_OK;
    if (!json_is_integer(layers) || json_integer_value(layers) < 1 || json_integer_value(layers) > 4096) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: num_hidden_layers missing or out of range", path);
        st = SPEED_ERR_FORMAT;
    } else if (!json_is_integer(ctx) || json_integer_value(ctx) < 2) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: max_position_embeddings missing or out of range", path);
        st = SPEED_ERR_FORMAT;
    } else {
        *n_layers_p = (int32_t)json_integer_value(layers);
        *n_ctx_p = json_integer_value(ctx);
    }
    json_decref(root);
    return st;
}

/* The served model name: the configured one, else the model directory's base name. */
static void model_name(const speed_cluster_config_t *cfg, char *out, size_t cap) {
    if (cfg->served_model_name && cfg->served_model_name[0]) {
        snprintf(out, cap, "%s", cfg->served_model_name);
        return;
    }
    size_t n = strlen(cfg->model);
    while (n > 1 && cfg->model[n - 1] == '/') n--;
    size_t b = n;
    while (b > 0 && cfg->model[b - 1] != '/') b--;
    snprintf(out, cap, "%.*s", (int)(n - b), cfg->model + b);
}

int main(int argc, char **argv) {
    /* Before any thread exists: every thread inherits the mask (signals.h). */
    sigset_t sigs;
    speed_signals_block_stop(&sigs);
    json_set_alloc_funcs(speed_malloc, speed_free);

    speed_cluster_config_t cfg;
    speed_config_t *cfgh = NULL;
    if (speed_cluster_config_load(argc, argv, "router", &cfg, &cfgh) != SPEED_OK) {
        fprintf(stderr, "speed-router: see 'speed-router --help'\n");
        return EXIT_USAGE;
    }
    if (speed_config_help_requested(cfgh)) {
        printf("usage: speed-router --config CLUSTER.yaml [--model DIR] [--KEY VALUE ...]\n\n"
               "The OpenAI-compatible HTTP front end of a speedserve cluster (docs/router.md).\n"
               "It reads the router.* keys and finds the nodes from the prefill.* and decode.*\n"
               "pools of the cluster file.\n\noptions:\n");
        fflush(stdout);
        size_t n_fields = 0;
        const speed_config_field_t *fields = speed_cluster_config_fields(&n_fields);
        speed_config_print_help(fields, n_fields, "SPEED_", stdout);
        speed_config_destroy(cfgh);
        return 0;
    }
    if (speed_config_print_requested(cfgh)) {
        speed_status_t st = speed_config_print(cfgh, stdout);
        speed_config_destroy(cfgh);
        return st == SPEED_OK ? 0 : 1;
    }
    char *const *pos = NULL;
    if (speed_config_positional(cfgh, &pos) > 0) {
        fprintf(stderr, "speed-router: unexpected argument '%s' (options are --key value)\n", pos[0]);
        speed_config_destroy(cfgh);
        return EXIT_USAGE;
    }
    if (speed_log_configure(cfg.log) != SPEED_OK) {
        fprintf(stderr, "speed-router: bad log spec '%s'\n", cfg.log);
        speed_config_destroy(cfgh);
        return EXIT_USAGE;
    }
    if (!cfg.model || !cfg.model[0]) {
        fprintf(stderr, "speed-router: no model directory (model: in the file, or --model DIR)\n");
        speed_config_destroy(cfgh);
        return EXIT_USAGE;
    }

    /* Control plane credentials first: a router that cannot reach its nodes should say why
     * before it loads anything. */
    speed_tls_creds_t creds;
    if (speed_cluster_tls_load(&cfg, "speed-router", "router", &creds) != SPEED_OK) {
        speed_config_destroy(cfgh);
        return EXIT_USAGE;
    }
    speed_rpc_tls_t rpc_tls = {.ca = creds.ca, .cert = creds.cert, .key = creds.key};

    int rc = 1;
    speed_tok_t *tok = NULL;
    speed_router_t *rt = NULL;
    int32_t n_layers = 0;
    int64_t n_ctx = 0;
    char name[256];
    model_name(&cfg, name, sizeof name);
    if (read_model_shape(cfg.model, &n_layers, &n_ctx) != SPEED_OK) goto out;
    if (cfg.max_context > 0) n_ctx = cfg.max_context;
    speed_tok_params_t tp = speed_tok_default_params();
    if (speed_tok_load(cfg.model, &tp, &tok) != SPEED_OK) goto out;

    speed_router_params_t rp;
    memset(&rp, 0, sizeof rp);
    rp.cfg = &cfg;
    rp.tok = tok;
    rp.model_id = name;
    rp.n_layers = n_layers;
    rp.n_ctx = n_ctx;
    rp.tls = creds.cert ? &rpc_tls : NULL;
    if (speed_router_create(&rp, &rt) != SPEED_OK) goto out;
    if (speed_router_start(rt) != SPEED_OK) goto out;
    /* Scripts and tests read the bound port from this line (router.port 0 = any port). */
    printf("speed-router: listening on %s:%u\n", cfg.router_listen, (unsigned)speed_router_port(rt));
    if (speed_router_metrics_port(rt))
        printf("speed-router: metrics on %s:%u\n", cfg.metrics_listen, (unsigned)speed_router_metrics_port(rt));
    fflush(stdout);

    int sig = speed_signals_wait(&sigs, -1);
    SPEED_INFO(SPEED_SUBSYS_NET, "router: %s, draining", sig == SIGINT ? "SIGINT" : "SIGTERM");
    speed_router_drain(rt);
    int64_t grace =
        cfg.request_timeout_ms < SPEED_ROUTER_DRAIN_GRACE_MS ? cfg.request_timeout_ms : SPEED_ROUTER_DRAIN_GRACE_MS;
    int64_t t0 = speed_clock_mono_ms();
    for (;;) {
        if (speed_router_wait_idle(rt, 100)) break;
        if (speed_signals_wait(&sigs, 0) >= 0) {
            SPEED_WARN(SPEED_SUBSYS_NET, "router: second signal, exiting now");
            fflush(NULL);
            _exit(1);
        }
        if (speed_clock_mono_ms() - t0 >= grace) {
            SPEED_WARN(SPEED_SUBSYS_NET, "router: %d request(s) still running after %lld ms; cancelling",
                       speed_router_n_workers(rt), (long long)grace);
            speed_router_cancel_all(rt);
            break;
        }
    }
    if (!speed_router_destroy(rt)) {
        fflush(NULL);
        _exit(1);
    }
    rt = NULL;
    SPEED_INFO(SPEED_SUBSYS_NET, "router: stopped");
    rc = 0;
out:
    if (rt) speed_router_destroy(rt);
    speed_tok_destroy(tok);
    speed_tls_creds_cleanup(&creds);
    speed_config_destroy(cfgh);
    return rc;
}
