/* speed_router_keys: API keys from the environment/cluster file and a keys file, with per-key
 * limits (api_keys.h). */
#include "api_keys.h"

#include <ctype.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "alloc.h"
#include "file.h"
#include "log.h"

#define SUBSYS        SPEED_SUBSYS_NET
#define KEY_NAME_MAX  64
#define KEYS_FILE_MAX ((size_t)16 << 20)

struct speed_router_key {
    char *key;
    char name[KEY_NAME_MAX];
    speed_router_key_limits_t lim;

    pthread_mutex_t lock;
    int64_t in_flight;
    int64_t kv_tokens;
    double bucket;   /* tokens in the rate bucket */
    double bucket_t; /* monotonic s of the last refill; < 0 = never */
};

struct speed_router_keys {
    speed_router_key_t *v;
    size_t n, cap;
    const char **texts; /* [n]: v[i].key, for the constant-time check */
};

static speed_status_t keys_add(speed_router_keys_t *ks, const char *key, size_t len, const char *name,
                               const speed_router_key_limits_t *lim, const char *where) {
    for (size_t i = 0; i < ks->n; i++)
        if (strlen(ks->v[i].key) == len && memcmp(ks->v[i].key, key, len) == 0) {
            SPEED_ERROR(SUBSYS, "router: %s: the same API key twice (as \"%s\")", where, ks->v[i].name);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    if (ks->n == ks->cap) {
        size_t cap = ks->cap ? ks->cap * 2 : 8;
        speed_router_key_t *v = speed_realloc(ks->v, cap * sizeof *v);
        if (!v) return SPEED_ERR_NO_MEMORY;
        ks->v = v;
        ks->cap = cap;
    }
    speed_router_key_t *k = &ks->v[ks->n];
    memset(k, 0, sizeof *k);
    k->key = speed_malloc(len + 1);
    if (!k->key) return SPEED_ERR_NO_MEMORY;
    memcpy(k->key, key, len);
    k->key[len] = '\0';
    snprintf(k->name, sizeof k->name, "%s", name);
    k->lim = *lim;
    k->bucket_t = -1;
    ks->n++;
    return SPEED_OK;
}

static bool name_ok(const char *s) {
    if (!*s || strlen(s) >= KEY_NAME_MAX) return false;
    for (; *s; s++)
        if (!(isalnum((unsigned char)*s) || *s == '_' || *s == '.' || *s == '-')) return false;
    return true;
}

/* One NAME=VALUE override of a keys-file line. */
static bool apply_option(const char *opt, char *name, speed_router_key_limits_t *lim) {
    const char *eq = strchr(opt, '=');
    if (!eq || eq == opt) return false;
    size_t n = (size_t)(eq - opt);
    const char *v = eq + 1;
    char *end = NULL;
    if (n == 4 && strncmp(opt, "name", 4) == 0) {
        if (!name_ok(v)) return false;
        snprintf(name, KEY_NAME_MAX, "%s", v);
        return true;
    }
    if (n == 4 && strncmp(opt, "rate", 4) == 0) {
        double d = strtod(v, &end);
        if (end == v || *end || !isfinite(d) || d < 0) return false;
        lim->rate = d;
        return true;
    }
    long long x = strtoll(v, &end, 10);
    if (end == v || *end || x < 0) return false;
    if (n == 13 && strncmp(opt, "max_in_flight", 13) == 0)
        lim->max_in_flight = x;
    else if (n == 13 && strncmp(opt, "max_kv_tokens", 13) == 0)
        lim->max_kv_tokens = x;
    else if (n == 5 && strncmp(opt, "burst", 5) == 0)
        lim->burst = x;
    else
        return false;
    return true;
}

static speed_status_t load_file(speed_router_keys_t *ks, const char *path, const speed_router_key_limits_t *defaults) {
    struct stat sb;
    if (stat(path, &sb) == 0 && (sb.st_mode & 077))
        SPEED_WARN(SUBSYS, "router: %s can be read by other users (chmod 600 it)", path);
    char *text = NULL;
    size_t len = 0;
    SPEED_CHECK(speed_file_read(path, KEYS_FILE_MAX, SUBSYS, SPEED_FILE_READ_DEFAULT, &text, &len));
    speed_status_t st = SPEED_OK;
    int line_no = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line && st == SPEED_OK; line = strtok_r(NULL, "\n", &save)) {
        line_no++;
        char where[1100];
        snprintf(where, sizeof where, "%s:%d", path, line_no);
        char *tok_save = NULL;
        char *key = strtok_r(line, " \t\r", &tok_save);
        if (!key || key[0] == '#') continue;
        char name[KEY_NAME_MAX];
        snprintf(name, sizeof name, "key%d", line_no);
        speed_router_key_limits_t lim = *defaults;
        for (char *opt = strtok_r(NULL, " \t\r", &tok_save); opt; opt = strtok_r(NULL, " \t\r", &tok_save)) {
            if (opt[0] == '#') break;
            if (!apply_option(opt, name, &lim)) {
                /* Only the option's name is shown: a word without '=' may be a key that was
                 * put in the wrong place (a second key on the line), and keys are not logged. */
                const char *eq = strchr(opt, '=');
                int n_show = eq ? (int)(eq - opt) : 0;
                SPEED_ERROR(SUBSYS,
                            "router: %s: bad option %s%.*s%s (expected name=, max_in_flight=, max_kv_tokens=, "
                            "rate=, burst=; one key per line)",
                            where, eq ? "\"" : "", n_show > 40 ? 40 : n_show, opt,
                            eq ? "=...\"" : "(a word without '=')");
                st = SPEED_ERR_INVALID_ARGUMENT;
                break;
            }
        }
        if (st == SPEED_OK) st = keys_add(ks, key, strlen(key), name, &lim, where);
    }
    /* The file held secrets: wipe the copy. */
    volatile char *w = text;
    for (size_t i = 0; i < len; i++) w[i] = 0;
    speed_free(text);
    return st;
}

speed_status_t speed_router_keys_create(const char *list, const char *file, const speed_router_key_limits_t *defaults,
                                        speed_router_keys_t **keys_p) {
    if (!defaults || !keys_p) return SPEED_ERR_INVALID_ARGUMENT;
    speed_router_keys_t *ks = speed_calloc(1, sizeof *ks);
    if (!ks) return SPEED_ERR_NO_MEMORY;
    speed_status_t st = SPEED_OK;
    int n_env = 0;
    for (const char *p = list ? list : ""; *p && st == SPEED_OK;) {
        const char *comma = strchr(p, ',');
        const char *e = comma ? comma : p + strlen(p);
        const char *a = p;
        while (a < e && isspace((unsigned char)*a)) a++;
        const char *b = e;
        while (b > a && isspace((unsigned char)b[-1])) b--;
        if (b > a) {
            char name[KEY_NAME_MAX];
            snprintf(name, sizeof name, "env%d", n_env++);
            st = keys_add(ks, a, (size_t)(b - a), name, defaults, "router.api_keys");
        }
        p = comma ? comma + 1 : e;
    }
    if (st == SPEED_OK && file && file[0]) st = load_file(ks, file, defaults);
    if (st == SPEED_OK && ks->n) {
        ks->texts = speed_calloc(ks->n, sizeof *ks->texts);
        if (!ks->texts) st = SPEED_ERR_NO_MEMORY;
    }
    if (st != SPEED_OK) {
        speed_router_keys_destroy(ks);
        return st;
    }
    for (size_t i = 0; i < ks->n; i++) {
        ks->texts[i] = ks->v[i].key;
        pthread_mutex_init(&ks->v[i].lock, NULL);
    }
    *keys_p = ks;
    return SPEED_OK;
}

void speed_router_keys_destroy(speed_router_keys_t *ks) {
    if (!ks) return;
    bool inited = ks->texts != NULL;
    for (size_t i = 0; i < ks->n; i++) {
        volatile char *w = ks->v[i].key;
        for (size_t j = 0; w[j]; j++) w[j] = 0;
        speed_free(ks->v[i].key);
        if (inited) pthread_mutex_destroy(&ks->v[i].lock);
    }
    speed_free(ks->texts);
    speed_free(ks->v);
    speed_free(ks);
}

size_t speed_router_keys_count(const speed_router_keys_t *ks) { return ks ? ks->n : 0; }

bool speed_router_keys_check(const speed_router_keys_t *ks, const char *authorization, speed_router_key_t **key_p,
                             speed_openai_error_t *err) {
    *key_p = NULL;
    if (!ks || ks->n == 0) return true;
    size_t idx = 0;
    if (!speed_openai_auth_match(authorization, ks->texts, ks->n, &idx, err)) return false;
    *key_p = &ks->v[idx];
    return true;
}

const char *speed_router_key_name(const speed_router_key_t *key) { return key ? key->name : ""; }

static int retry_seconds(double s) {
    double c = ceil(s);
    return c < 1 ? 1 : c > 3600 ? 3600 : (int)c;
}

bool speed_router_key_enter(speed_router_key_t *key, double now_s, speed_openai_error_t *err, int *retry_after_s_p,
                            const char **limit_p) {
    if (!key) return true;
    bool ok = true;
    pthread_mutex_lock(&key->lock);
    const speed_router_key_limits_t *l = &key->lim;
    if (l->max_in_flight > 0 && key->in_flight >= l->max_in_flight) {
        ok = false;
        *limit_p = "in_flight";
        *retry_after_s_p = 1;
        speed_openai_error_set(err, SPEED_OPENAI_ERR_OVERLOADED, NULL, "rate_limit_exceeded",
                               "Rate limit reached for this API key: at most %lld requests in flight. Retry after a "
                               "running request has finished.",
                               (long long)l->max_in_flight);
    }
    if (ok && l->rate > 0) {
        double depth = l->burst > 0 ? (double)l->burst : (l->rate > 1 ? l->rate : 1);
        if (key->bucket_t < 0) {
            key->bucket = depth;
        } else {
            key->bucket += (now_s - key->bucket_t) * l->rate;
            if (key->bucket > depth) key->bucket = depth;
        }
        key->bucket_t = now_s;
        if (key->bucket < 1) {
            ok = false;
            *limit_p = "rate";
            *retry_after_s_p = retry_seconds((1 - key->bucket) / l->rate);
            speed_openai_error_set(err, SPEED_OPENAI_ERR_OVERLOADED, NULL, "rate_limit_exceeded",
                                   "Rate limit reached for this API key: %g requests per second (burst %g). Retry "
                                   "after %d s.",
                                   l->rate, depth, *retry_after_s_p);
        } else {
            key->bucket -= 1;
        }
    }
    if (ok) key->in_flight++;
    pthread_mutex_unlock(&key->lock);
    return ok;
}

void speed_router_key_leave(speed_router_key_t *key) {
    if (!key) return;
    pthread_mutex_lock(&key->lock);
    SPEED_ASSERT(key->in_flight > 0);
    key->in_flight--;
    pthread_mutex_unlock(&key->lock);
}

bool speed_router_key_kv_reserve(speed_router_key_t *key, int64_t tokens, speed_openai_error_t *err) {
    if (!key) return true;
    bool ok = true;
    pthread_mutex_lock(&key->lock);
    int64_t lim = key->lim.max_kv_tokens;
    if (lim > 0 && key->kv_tokens + tokens > lim) {
        ok = false;
        if (tokens > lim)
            speed_openai_error_set(err, SPEED_OPENAI_ERR_OVERLOADED, NULL, "rate_limit_exceeded",
                                   "This request needs %lld KV tokens (prompt + max_tokens), more than this API key "
                                   "may hold at once (%lld). Reduce max_tokens or the prompt.",
                                   (long long)tokens, (long long)lim);
        else
            speed_openai_error_set(err, SPEED_OPENAI_ERR_OVERLOADED, NULL, "rate_limit_exceeded",
                                   "Rate limit reached for this API key: its running requests hold %lld of %lld KV "
                                   "tokens and this one needs %lld. Retry after a running request has finished.",
                                   (long long)key->kv_tokens, (long long)lim, (long long)tokens);
    } else {
        key->kv_tokens += tokens;
    }
    pthread_mutex_unlock(&key->lock);
    return ok;
}

void speed_router_key_kv_release(speed_router_key_t *key, int64_t tokens) {
    if (!key || tokens <= 0) return;
    pthread_mutex_lock(&key->lock);
    SPEED_ASSERT(key->kv_tokens >= tokens);
    key->kv_tokens -= tokens;
    pthread_mutex_unlock(&key->lock);
}
