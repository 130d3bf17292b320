/* Naive full-recompute SPEED reference (naive_ref.h). Deliberately simple: one token, one
 * head, one element at a time. */
#include "naive_ref.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float *attn_norm, *wq, *wk, *wv, *wo, *ffn_norm, *w_gate, *w_up, *w_down;
} naive_layer_t;

struct naive_model {
    speed_model_config_t cfg;
    float *embed, *norm, *lm_head; /* lm_head may equal embed (tied) */
    naive_layer_t *layers;
    float *inv_freq; /* [head_dim / 2] */
};

static float *to_f32(const speed_tensor_t *t) {
    size_t n = (size_t)speed_tensor_n_elements(t);
    float *out = malloc(n * sizeof(float));
    if (out) speed_dtype_to_f32(t->dtype, t->data, out, n);
    return out;
}

/* HF rope_type "default" / "llama3" inverse frequencies, in double, rounded once to f32. */
static float inv_freq_of(const speed_model_config_t *c, int i) {
    double f = (float)(1.0 / pow((double)c->rope_theta, (double)(2 * i) / (double)c->head_dim));
    if (c->rope_scaling.type != SPEED_ROPE_SCALING_LLAMA3) return (float)f;
    double factor = c->rope_scaling.factor, lo = c->rope_scaling.low_freq_factor, hi = c->rope_scaling.high_freq_factor,
           orig = c->rope_scaling.original_max_position;
    double wavelen = 2.0 * M_PI / f;
    if (wavelen < orig / hi) return (float)f;
    if (wavelen > orig / lo) return (float)(f / factor);
    double smooth = (orig / wavelen - lo) / (hi - lo);
    return (float)((1.0 - smooth) * f / factor + smooth * f);
}

naive_model_t *naive_model_create(const speed_model_t *m) {
    naive_model_t *nm = calloc(1, sizeof *nm);
    if (!nm) return NULL;
    nm->cfg = m->config;
    int L = m->config.n_layers;
    nm->layers = calloc((size_t)L, sizeof *nm->layers);
    nm->embed = to_f32(m->tok_embeddings);
    nm->norm = to_f32(m->norm);
    nm->lm_head = m->lm_head == m->tok_embeddings ? nm->embed : to_f32(m->lm_head);
    nm->inv_freq = malloc((size_t)(m->config.head_dim / 2) * sizeof(float));
    bool ok = nm->layers && nm->embed && nm->norm && nm->lm_head && nm->inv_freq;
    for (int l = 0; ok && l < L; l++) {
        const speed_layer_weights_t *w = &m->layers[l];
        naive_layer_t *o = &nm->layers[l];
        o->attn_norm = to_f32(w->attn_norm);
        o->wq = to_f32(w->wq);
        o->wk = to_f32(w->wk);
        o->wv = to_f32(w->wv);
        o->wo = to_f32(w->wo);
        o->ffn_norm = to_f32(w->ffn_norm);
        o->w_gate = to_f32(w->w_gate);
        o->w_up = to_f32(w->w_up);
        o->w_down = to_f32(w->w_down);
        ok = o->attn_norm && o->wq && o->wk && o->wv && o->wo && o->ffn_norm && o->w_gate && o->w_up && o->w_down;
    }
    if (!ok) {
        naive_model_destroy(nm);
        return NULL;
    }
    for (int i = 0; i < m->config.head_dim / 2; i++) nm->inv_freq[i] = inv_freq_of(&m->config, i);
    return nm;
}

void naive_model_destroy(naive_model_t *nm) {
    if (!nm) return;
    if (nm->layers) {
        for (int l = 0; l < nm->cfg.n_layers; l++) {
            naive_layer_t *o = &nm->layers[l];
            free(o->attn_norm), free(o->wq), free(o->wk), free(o->wv), free(o->wo);
            free(o->ffn_norm), free(o->w_gate), free(o->w_up), free(o->w_down);
        }
    }
    if (nm->lm_head != nm->embed) free(nm->lm_head);
    free(nm->embed);
    free(nm->norm);
    free(nm->layers);
    free(nm->inv_freq);
    free(nm);
}

/* out[d] = x[d] / rms(x) * w[d] */
static void rmsnorm(float *out, const float *x, const float *w, int d, float eps) {
    double ss = 0;
    for (int i = 0; i < d; i++) ss += (double)x[i] * x[i];
    double inv = 1.0 / sqrt(ss / d + eps);
    for (int i = 0; i < d; i++) out[i] = (float)(x[i] * inv) * w[i];
}

/* out[r] = Σ_c w[r][c] x[c], w [rows][cols] */
static void matvec(float *out, const float *w, const float *x, int rows, int cols) {
    for (int r = 0; r < rows; r++) {
        double acc = 0;
        for (int c = 0; c < cols; c++) acc += (double)w[(size_t)r * cols + c] * x[c];
        out[r] = (float)acc;
    }
}

static void rope(float *v, int n_heads, int hd, int pos, const float *inv_freq) {
    for (int i = 0; i < hd / 2; i++) {
        float angle = (float)pos * inv_freq[i];
        double c = cos((double)angle), s = sin((double)angle);
        for (int h = 0; h < n_heads; h++) {
            float *x = v + h * hd;
            double a = x[i], b = x[i + hd / 2];
            x[i] = (float)(a * c - b * s);
            x[i + hd / 2] = (float)(b * c + a * s);
        }
    }
}

static float round_to(speed_dtype_t dtype, float v) {
    unsigned char buf[4];
    float out;
    speed_dtype_from_f32(dtype, &v, buf, 1);
    speed_dtype_to_f32(dtype, buf, &out, 1);
    return out;
}

int naive_ref_logits(const naive_model_t *nm, const int32_t *tokens, int N, int n_prompt, int C, int A, int T,
                     speed_dtype_t kv_dtype, int n_out, float *logits) {
    const speed_model_config_t *c = &nm->cfg;
    const int L = c->n_layers, H = c->hidden, nh = c->n_heads, nkv = c->n_kv_heads, hd = c->head_dim, F = c->ffn,
              V = c->vocab_size;
    const int qd = nh * hd, kvd = nkv * hd, group = nh / nkv;
    if (N < 1 || n_prompt < 1 || n_prompt > N || C < 1 || C > L || A < 0 || T < 1 || n_out < 1 ||
        N - n_out < n_prompt - 1) {
        fprintf(stderr, "naive_ref: bad arguments\n");
        return -1;
    }
    for (int i = 0; i < N; i++)
        if (tokens[i] < 0 || tokens[i] >= V) {
            fprintf(stderr, "naive_ref: token %d out of range\n", tokens[i]);
            return -1;
        }
    const int a = A < n_prompt ? A : n_prompt;
    const int tail_start = n_prompt - T > a ? n_prompt - T : a;

    float *x = malloc((size_t)N * H * sizeof(float));
    float *q = malloc((size_t)N * qd * sizeof(float));
    float *k = malloc((size_t)N * kvd * sizeof(float));
    float *v = malloc((size_t)N * kvd * sizeof(float));
    float *h = malloc((size_t)(H > F ? H : F) * 3 * sizeof(float));
    float *att = malloc((size_t)qd * sizeof(float));
    double *p = malloc((size_t)N * sizeof(double));
    bool *exists = malloc((size_t)N * sizeof(bool));
    if (!x || !q || !k || !v || !h || !att || !p || !exists) {
        fprintf(stderr, "naive_ref: out of memory\n");
        free(x), free(q), free(k), free(v), free(h), free(att), free(p), free(exists);
        return -1;
    }
    for (int i = 0; i < N; i++) memcpy(x + (size_t)i * H, nm->embed + (size_t)tokens[i] * H, H * sizeof(float));

    for (int l = 0; l < L; l++) {
        const naive_layer_t *w = &nm->layers[l];
        for (int i = 0; i < N; i++) exists[i] = l < C || i < a || i >= tail_start;
        /* q, k, v of every existing token */
        for (int i = 0; i < N; i++) {
            if (!exists[i]) continue;
            rmsnorm(h, x + (size_t)i * H, w->attn_norm, H, c->rms_norm_eps);
            matvec(q + (size_t)i * qd, w->wq, h, qd, H);
            matvec(k + (size_t)i * kvd, w->wk, h, kvd, H);
            matvec(v + (size_t)i * kvd, w->wv, h, kvd, H);
            rope(q + (size_t)i * qd, nh, hd, i, nm->inv_freq);
            rope(k + (size_t)i * kvd, nkv, hd, i, nm->inv_freq);
            for (int d = 0; d < kvd; d++) {
                k[(size_t)i * kvd + d] = round_to(kv_dtype, k[(size_t)i * kvd + d]);
                v[(size_t)i * kvd + d] = round_to(kv_dtype, v[(size_t)i * kvd + d]);
            }
        }
        /* attention, then the MLP, per existing token (rows are independent given k, v) */
        for (int i = 0; i < N; i++) {
            if (!exists[i]) continue;
            for (int hh = 0; hh < nh; hh++) {
                const float *qi = q + (size_t)i * qd + hh * hd;
                int kvh = hh / group;
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= i; j++) {
                    if (!exists[j]) continue;
                    const float *kj = k + (size_t)j * kvd + kvh * hd;
                    double dot = 0;
                    for (int d = 0; d < hd; d++) dot += (double)qi[d] * kj[d];
                    p[j] = dot / sqrt((double)hd);
                    if (p[j] > mx) mx = p[j];
                }
                for (int j = 0; j <= i; j++)
                    if (exists[j]) sum += (p[j] = exp(p[j] - mx));
                for (int d = 0; d < hd; d++) {
                    double acc = 0;
                    for (int j = 0; j <= i; j++)
                        if (exists[j]) acc += p[j] * v[(size_t)j * kvd + kvh * hd + d];
                    att[hh * hd + d] = (float)(acc / sum);
                }
            }
            float *xi = x + (size_t)i * H;
            matvec(h, w->wo, att, H, qd);
            for (int d = 0; d < H; d++) xi[d] += h[d];
            float *g = h, *u = h + F, *n = h + 2 * F;
            rmsnorm(n, xi, w->ffn_norm, H, c->rms_norm_eps);
            matvec(g, w->w_gate, n, F, H);
            matvec(u, w->w_up, n, F, H);
            for (int f = 0; f < F; f++) g[f] = (float)((double)g[f] / (1.0 + exp(-(double)g[f])) * u[f]);
            matvec(n, w->w_down, g, H, F);
            for (int d = 0; d < H; d++) xi[d] += n[d];
        }
    }
    for (int o = 0; o < n_out; o++) {
        int i = N - n_out + o;
        rmsnorm(h, x + (size_t)i * H, nm->norm, H, c->rms_norm_eps);
        matvec(logits + (size_t)o * V, nm->lm_head, h, V, H);
    }
    free(x), free(q), free(k), free(v), free(h), free(att), free(p), free(exists);
    return 0;
}

void naive_log_softmax(const float *logits, int n, float *out) {
    double mx = -INFINITY, sum = 0;
    for (int i = 0; i < n; i++)
        if (logits[i] > mx) mx = logits[i];
    for (int i = 0; i < n; i++) sum += exp((double)logits[i] - mx);
    double lse = mx + log(sum);
    for (int i = 0; i < n; i++) out[i] = (float)((double)logits[i] - lse);
}
