/* The operator metrics (docs/metrics.md) on a real 1P1D cluster: each one moves as it must after
 * known requests, and the one table of docs/metrics.md matches what the three processes export.
 *
 *  1. Three disaggregated completions (40 prompt tokens, C = 3 of 4 layers, anchors 1, tail 1,
 *     8 tokens) and one decode-only completion (8 prompt tokens, under router.decode_only_below):
 *     - prefill: speed_engine_prompt_tokens_total{depth="full"} += 3 * 2 (anchor + tail),
 *       {depth="shallow"} += 3 * 38; speed_kv_bytes_saved_total += 3 * (KV at C=4 - KV at C=3)
 *       (kv_bytes_for_prompt, exact); the step histograms count the same steps, and their token
 *       sum is the prompt tokens computed; one queue wait and one exposed-transfer time per request;
 *     - decode: the decode-only prompt by depth (2 full, 6 shallow) and its KV saved; four queue
 *       waits; step tokens at least the 8 prompt rows plus 4 * 7 decode rows;
 *     - router: four e2e, TPOT and queue-wait observations; TPOT's sum within e2e's sum;
 *     - speed_node_state{role} is 1 (serving) on both nodes.
 *  2. speed_engine_tokens_in_flight: during a long stream the decode node reports at least its
 *     prompt; once it ends, 0.
 *  3. docs/metrics.md: every family the router, the prefill and the decode node export is a row
 *     of the table with its type, its process and every label name it uses; every row is exported
 *     by the process it names. */
#include "log.h"
#include "model.h"
#include "openai_util.h"
#include "test_fs.h"

#define N_PROMPT 40
#define N_SHORT  8
#define N_GEN    8
#define N_DIS    3

static const speed_model_config_t *g_mc;
static int g_rport, g_pport, g_dport;

static double m(int port, const char *series) {
    double v = cu_metric(port, series);
    return isnan(v) ? 0 : v;
}

static size_t kv_at(int C, int n) { return speed_kv_bytes_for_prompt(g_mc, C, 1, 1, n, SPEED_DTYPE_BF16); }

typedef struct {
    double pre_full, pre_shallow, pre_saved, pre_steps, pre_step_seqs, pre_step_tok, pre_tok_sum, pre_qw, pre_exposed,
        pre_xfer;
    double dec_full, dec_shallow, dec_saved, dec_steps, dec_step_seqs, dec_step_tok, dec_qw;
    double r_e2e, r_tpot, r_tpot_sum, r_e2e_sum, r_qw;
} snap_t;

static void snap(snap_t *s) {
    s->pre_full = m(g_pport, "speed_engine_prompt_tokens_total{role=\"prefill\",depth=\"full\"}");
    s->pre_shallow = m(g_pport, "speed_engine_prompt_tokens_total{role=\"prefill\",depth=\"shallow\"}");
    s->pre_saved = m(g_pport, "speed_kv_bytes_saved_total{role=\"prefill\"}");
    s->pre_steps = m(g_pport, "speed_engine_step_duration_seconds_count{role=\"prefill\"}");
    s->pre_step_seqs = m(g_pport, "speed_engine_step_sequences_count{role=\"prefill\"}");
    s->pre_step_tok = m(g_pport, "speed_engine_step_tokens_sum{role=\"prefill\"}");
    s->pre_tok_sum = m(g_pport, "speed_prefill_tokens_total");
    s->pre_qw = m(g_pport, "speed_engine_queue_wait_seconds_count{role=\"prefill\"}");
    s->pre_exposed = m(g_pport, "speed_kv_transfer_exposed_seconds_count{role=\"prefill\"}");
    s->pre_xfer = m(g_pport, "speed_kv_transfer_seconds_count");
    s->dec_full = m(g_dport, "speed_engine_prompt_tokens_total{role=\"decode\",depth=\"full\"}");
    s->dec_shallow = m(g_dport, "speed_engine_prompt_tokens_total{role=\"decode\",depth=\"shallow\"}");
    s->dec_saved = m(g_dport, "speed_kv_bytes_saved_total{role=\"decode\"}");
    s->dec_steps = m(g_dport, "speed_engine_step_duration_seconds_count{role=\"decode\"}");
    s->dec_step_seqs = m(g_dport, "speed_engine_step_sequences_count{role=\"decode\"}");
    s->dec_step_tok = m(g_dport, "speed_engine_step_tokens_sum{role=\"decode\"}");
    s->dec_qw = m(g_dport, "speed_engine_queue_wait_seconds_count{role=\"decode\"}");
    s->r_e2e = m(g_rport, "speed_router_e2e_request_latency_seconds_count");
    s->r_e2e_sum = m(g_rport, "speed_router_e2e_request_latency_seconds_sum");
    s->r_tpot = m(g_rport, "speed_router_time_per_output_token_seconds_count");
    s->r_tpot_sum = m(g_rport, "speed_router_time_per_output_token_seconds_sum");
    s->r_qw = m(g_rport, "speed_router_queue_wait_seconds_count");
}

static void complete(const int32_t *ids, int n, int max_tokens) {
    char *body = ou_completion_body("model", ids, n, max_tokens, 0, false, NULL, NULL);
    cu_resp_t resp;
    CHECK(cu_http(g_rport, "POST", "/v1/completions", body, NULL, NULL, 60000, &resp));
    CHECK_MSG(resp.status == 200, "HTTP %d: %s", resp.status, resp.body ? resp.body : "");
    cu_resp_free(&resp);
    speed_free(body);
}

/* Polls until the decode node's request counter reaches want (the finish event, hence every
 * metric of the request, is recorded before the counter moves... and before the reply). */
static void wait_settled(const snap_t *before) {
    double t0 = now_s();
    snap_t s;
    for (;;) {
        snap(&s);
        if (s.pre_exposed - before->pre_exposed >= N_DIS && s.dec_qw - before->dec_qw >= N_DIS + 1 &&
            s.r_e2e - before->r_e2e >= N_DIS + 1)
            return;
        if (now_s() - t0 > 10) return; /* the checks below say what is missing */
        usleep(20000);
    }
}

static void check_relations(void) {
    int32_t prompt[N_PROMPT], shorter[N_SHORT];
    ou_prompt(prompt, N_PROMPT, g_mc->vocab_size, 37);
    ou_prompt(shorter, N_SHORT, g_mc->vocab_size, 11);
    snap_t a, b;
    snap(&a);
    for (int i = 0; i < N_DIS; i++) complete(prompt, N_PROMPT, N_GEN);
    complete(shorter, N_SHORT, N_GEN); /* decode-only: under router.decode_only_below */
    wait_settled(&a);
    snap(&b);

    /* prefill node */
    CHECK_NEAR(b.pre_full - a.pre_full, N_DIS * 2, 0);
    CHECK_NEAR(b.pre_shallow - a.pre_shallow, N_DIS * (N_PROMPT - 2), 0);
    CHECK_NEAR((b.pre_full - a.pre_full) + (b.pre_shallow - a.pre_shallow), b.pre_tok_sum - a.pre_tok_sum, 0);
    CHECK_NEAR(b.pre_saved - a.pre_saved,
               (double)N_DIS * (double)(kv_at(g_mc->n_layers, N_PROMPT) - kv_at(3, N_PROMPT)), 0);
    CHECK_MSG(b.pre_steps - a.pre_steps >= 1, "prefill steps %.0f", b.pre_steps - a.pre_steps);
    CHECK_NEAR(b.pre_step_seqs - a.pre_step_seqs, b.pre_steps - a.pre_steps, 0);
    CHECK_NEAR(b.pre_step_tok - a.pre_step_tok, N_DIS * N_PROMPT, 0);
    CHECK_NEAR(b.pre_qw - a.pre_qw, N_DIS, 0);
    CHECK_NEAR(b.pre_exposed - a.pre_exposed, N_DIS, 0);
    CHECK_NEAR(b.pre_exposed - a.pre_exposed, b.pre_xfer - a.pre_xfer, 0);
    /* decode node: only the decode-only prompt was computed there */
    CHECK_NEAR(b.dec_full - a.dec_full, 2, 0);
    CHECK_NEAR(b.dec_shallow - a.dec_shallow, N_SHORT - 2, 0);
    CHECK_NEAR(b.dec_saved - a.dec_saved, (double)(kv_at(g_mc->n_layers, N_SHORT) - kv_at(3, N_SHORT)), 0);
    CHECK_NEAR(b.dec_qw - a.dec_qw, N_DIS + 1, 0);
    CHECK_NEAR(b.dec_step_seqs - a.dec_step_seqs, b.dec_steps - a.dec_steps, 0);
    CHECK_MSG(b.dec_step_tok - a.dec_step_tok >= N_SHORT + (N_DIS + 1) * (N_GEN - 1), "decode step tokens %.0f",
              b.dec_step_tok - a.dec_step_tok);
    /* router */
    CHECK_NEAR(b.r_e2e - a.r_e2e, N_DIS + 1, 0);
    CHECK_NEAR(b.r_tpot - a.r_tpot, N_DIS + 1, 0);
    CHECK_NEAR(b.r_qw - a.r_qw, N_DIS + 1, 0);
    CHECK_MSG(b.r_tpot_sum - a.r_tpot_sum > 0 && b.r_tpot_sum - a.r_tpot_sum < b.r_e2e_sum - a.r_e2e_sum,
              "TPOT sum %g, e2e sum %g", b.r_tpot_sum - a.r_tpot_sum, b.r_e2e_sum - a.r_e2e_sum);
    CHECK_NEAR(m(g_pport, "speed_node_state{role=\"prefill\"}"), 1, 0);
    CHECK_NEAR(m(g_dport, "speed_node_state{role=\"decode\"}"), 1, 0);
}

static void check_in_flight(void) {
    int32_t prompt[N_PROMPT];
    ou_prompt(prompt, N_PROMPT, g_mc->vocab_size, 5);
    const char *series = "speed_engine_tokens_in_flight{role=\"decode\"}";
    CHECK_NEAR(m(g_dport, series), 0, 0);
    char *body = ou_completion_body("model", prompt, N_PROMPT, 400, 0, true, NULL, NULL);
    cu_sse_t s;
    CHECK(cu_sse_begin(g_rport, "/v1/completions", body, NULL, 30000, &s));
    cu_sse_read(&s, 3, now_s() + 30);
    double seen = 0, t0 = now_s();
    while (seen < N_PROMPT && now_s() - t0 < 10) {
        seen = m(g_dport, series);
        if (seen < N_PROMPT) usleep(5000);
    }
    CHECK_MSG(seen >= N_PROMPT, "tokens in flight %g during a %d-token prompt's stream", seen, N_PROMPT);
    cu_sse_read(&s, -1, now_s() + 60);
    CHECK(s.ended);
    cu_sse_free(&s);
    speed_free(body);
    CHECK_MSG(cu_wait_metric(g_dport, series, 0, 5), "tokens in flight %g after the stream", m(g_dport, series));
}

/* ---- the table of docs/metrics.md against the exports --------------------------------------- */

typedef struct {
    char name[256], type[256], labels[256], process[256];
    bool seen;
} row_t;

/* The cells of a markdown row "| a | b | ... |" into cells[] (trimmed, backticks dropped). */
static int split_row(char *line, char cells[][256], int max) {
    int n = 0;
    char *p = strchr(line, '|');
    while (p && n < max) {
        char *q = strchr(p + 1, '|');
        if (!q) break;
        size_t k = 0;
        for (char *c = p + 1; c < q && k < 255; c++)
            if (*c != '`') cells[n][k++] = *c;
        cells[n][k] = 0;
        char *s = cells[n];
        while (*s == ' ') s++;
        memmove(cells[n], s, strlen(s) + 1);
        for (k = strlen(cells[n]); k > 0 && cells[n][k - 1] == ' ';) cells[n][--k] = 0;
        n++;
        p = q;
    }
    return n;
}

static int load_table(row_t *rows, int max) {
    const char *src = getenv("SPEED_SOURCE_DIR");
    CHECK_MSG(src != NULL, "SPEED_SOURCE_DIR is not set");
    if (!src) return 0;
    char path[600];
    snprintf(path, sizeof path, "%s/docs/metrics.md", src);
    FILE *f = fopen(path, "r");
    CHECK_MSG(f != NULL, "cannot open %s", path);
    if (!f) return 0;
    char line[2048];
    int n = 0;
    bool in_table = false;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "| Name", 6) == 0) {
            in_table = true;
            continue;
        }
        if (!in_table) continue;
        if (line[0] != '|') {
            if (n > 0) break; /* the table ended */
            continue;
        }
        char cells[6][256];
        if (split_row(line, cells, 6) < 5 || strncmp(cells[0], "---", 3) == 0) continue;
        CHECK_MSG(n < max, "too many rows");
        if (n >= max) break;
        snprintf(rows[n].name, sizeof rows[n].name, "%s", cells[0]);
        snprintf(rows[n].type, sizeof rows[n].type, "%s", cells[1]);
        snprintf(rows[n].labels, sizeof rows[n].labels, "%s", cells[2]);
        snprintf(rows[n].process, sizeof rows[n].process, "%s", cells[3]);
        rows[n].seen = false;
        for (int i = 0; i < n; i++) CHECK_MSG(strcmp(rows[i].name, rows[n].name) != 0, "%s: two rows", rows[n].name);
        n++;
    }
    fclose(f);
    return n;
}

/* A documented name may stand for one per role: speed_<role>_x is written speed_{role}_x. */
static row_t *find_row(row_t *rows, int n, const char *name, const char *role) {
    for (int i = 0; i < n; i++) {
        char expanded[160];
        const char *r = strstr(rows[i].name, "{role}");
        if (r)
            snprintf(expanded, sizeof expanded, "%.*s%s%s", (int)(r - rows[i].name), rows[i].name, role, r + 6);
        else
            snprintf(expanded, sizeof expanded, "%s", rows[i].name);
        if (strcmp(expanded, name) == 0) return &rows[i];
    }
    return NULL;
}

/* True when `label` is one of the comma-separated names of `cell` ("—" = none). */
static bool has_label(const char *cell, const char *label) {
    size_t k = strlen(label);
    for (const char *p = cell; (p = strstr(p, label)); p += k) {
        bool start = p == cell || p[-1] == ' ' || p[-1] == ',';
        bool end = p[k] == 0 || p[k] == ',' || p[k] == ' ';
        if (start && end) return true;
    }
    return false;
}

static void check_process(row_t *rows, int n, int port, const char *process, const char *role) {
    char *text = cu_metrics(port);
    CHECK_MSG(text != NULL, "%s: no /metrics", process);
    if (!text) return;
    char path[700]; /* kept with the logs when the test fails */
    snprintf(path, sizeof path, "%s/%s.metrics", cu_dir, process);
    tu_write_text(path, text);
    char *save = NULL;
    const char *current = NULL;
    row_t *row = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char name[160], type[32];
        if (sscanf(line, "# TYPE %159s %31s", name, type) == 2) {
            row = find_row(rows, n, name, role);
            CHECK_MSG(row != NULL, "%s exports %s, which docs/metrics.md does not list", process, name);
            if (!row) continue;
            row->seen = row->seen || strstr(row->process, process) != NULL;
            CHECK_MSG(strcmp(row->type, type) == 0, "%s: documented as %s, exported as %s", name, row->type, type);
            CHECK_MSG(strstr(row->process, process) != NULL, "%s: exported by %s, documented for '%s'", name, process,
                      row->process);
            current = row->name;
            continue;
        }
        if (line[0] == '#' || !row || !current) continue;
        const char *brace = strchr(line, '{');
        if (!brace) continue;
        for (const char *p = brace + 1; *p && *p != '}';) { /* label names of the sample */
            const char *eq = strchr(p, '=');
            if (!eq) break;
            char label[64];
            snprintf(label, sizeof label, "%.*s", (int)(eq - p < 63 ? eq - p : 63), p);
            if (strcmp(label, "le") != 0)
                CHECK_MSG(has_label(row->labels, label), "%s: label %s is not in its row", row->name, label);
            const char *q = eq + 2; /* past =" */
            while (*q && *q != '"') q += *q == '\\' && q[1] ? 2 : 1;
            p = *q ? q + 1 : q;
            if (*p == ',') p++;
        }
    }
    speed_free(text);
}

static void check_table(void) {
    row_t rows[160];
    int n = load_table(rows, 160);
    CHECK_MSG(n >= 40, "docs/metrics.md: %d rows", n);
    check_process(rows, n, g_rport, "router", "router");
    check_process(rows, n, g_pport, "prefill", "prefill");
    check_process(rows, n, g_dport, "decode", "decode");
    for (int i = 0; i < n; i++)
        CHECK_MSG(rows[i].seen, "docs/metrics.md lists %s, which nothing exports", rows[i].name);
}

int main(void) {
    speed_log_configure("error");
    cu_init("metrics_live");
    char model_dir[600];
    snprintf(model_dir, sizeof model_dir, "%s/model", cu_dir);
    speed_model_t *model = NULL;
    CHECK_INT_EQ(speed_model_load(model_dir, NULL, &model), SPEED_OK);
    if (!model) return CHECK_DONE();
    g_mc = &model->config;
    CHECK_INT_EQ(g_mc->n_layers, 4);

    const char *extra[] = {"--speed.prefill_layers",
                           "3",
                           "--router.decode_only_below",
                           "16",
                           "--decode.kv_tokens",
                           "8192",
                           "--log",
                           "info",
                           NULL};
    cu_cluster_t c;
    cu_cluster_init(&c, 1, 1, extra);
    bool ok = cu_cluster_start_nodes(&c, 60);
    CHECK_MSG(ok, "nodes did not come up");
    bool rok = false;
    cu_proc_t r = ok ? cu_cluster_router(&c, 0, NULL, 30, &rok) : (cu_proc_t){0};
    CHECK_MSG(rok, "router did not come up");
    g_rport = cu_router_port(&c, 0);
    g_pport = cu_pre_http(&c, 0);
    g_dport = cu_dec_http(&c, 0);
    if (ok && rok) {
        check_relations();
        check_in_flight();
        check_table();
    }
    if (r.pid > 0) cu_stop(&r, SIGTERM, 10);
    for (int i = 0; i < c.np; i++) cu_stop(&c.pre[i], SIGTERM, 10);
    for (int i = 0; i < c.nd; i++) cu_stop(&c.dec[i], SIGTERM, 10);
    bool failed = check_failures_ > 0;
    if (failed) {
        cu_log_tail("router0", 20);
        cu_log_tail("prefill0", 20);
        cu_log_tail("decode0", 20);
    }
    speed_model_destroy(model);
    cu_cleanup(failed);
    return CHECK_DONE();
}
