#include "model.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "alloc.h"
#include "log.h"
#include "file.h"
#include "safetensors.h"

#define INDEX_MAX_BYTES    (64u << 20)
#define MAX_NAME           160
#define MAX_EXTRA_WARNINGS 8

typedef struct {
    const speed_tensor_t *t;
    int file; /* index into files[] */
    bool used;
} model_entry_t;

struct speed_model_files {
    int n_files;
    speed_safetensors_t **files; /* [n_files] */
    int n_entries;
    model_entry_t *entries; /* [n_entries] sorted by name: the tensors the model sees */
    char *weights_path;     /* model.safetensors or model.safetensors.index.json */
    unsigned open_flags;    /* speed_safetensors_open_flags */
};

speed_model_params_t speed_model_default_params(void) { return (speed_model_params_t){.allow_extra_tensors = true}; }

static int entry_cmp(const void *a, const void *b) {
    return strcmp(((const model_entry_t *)a)->t->name, ((const model_entry_t *)b)->t->name);
}

static model_entry_t *entry_find(const struct speed_model_files *f, const char *name) {
    int lo = 0, hi = f->n_entries;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(name, f->entries[mid].t->name);
        if (c == 0) return &f->entries[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

static speed_status_t files_alloc(struct speed_model_files *f, int n_files, int n_entries) {
    f->files = speed_calloc((size_t)(n_files ? n_files : 1), sizeof *f->files);
    f->entries = speed_calloc((size_t)(n_entries ? n_entries : 1), sizeof *f->entries);
    if (!f->files || !f->entries) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: out of memory for the tensor table", f->weights_path);
        return SPEED_ERR_NO_MEMORY;
    }
    return SPEED_OK;
}

static speed_status_t weights_open_single(struct speed_model_files *f) {
    speed_safetensors_t *st = NULL;
    SPEED_CHECK(speed_safetensors_open_flags(f->weights_path, f->open_flags, &st));
    int n = speed_safetensors_n_tensors(st);
    speed_status_t status = files_alloc(f, 1, n);
    if (status != SPEED_OK) {
        speed_safetensors_close(st);
        return status;
    }
    f->files[0] = st;
    f->n_files = 1;
    for (int i = 0; i < n; i++) f->entries[i].t = speed_safetensors_tensor(st, i);
    f->n_entries = n; /* already sorted by name */
    return SPEED_OK;
}

static bool shard_name_ok(const char *s) {
    return s[0] && !strchr(s, '/') && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

static speed_status_t weights_open_index(struct speed_model_files *f, const char *dir) {
    const char *ipath = f->weights_path;
    char *text = NULL;
    size_t len = 0;
    json_t *root = NULL;
    const char **shards = NULL; /* unique shard names, borrowed from root */
    char *shard_path = NULL;
    speed_status_t status;

    SPEED_CHECK(speed_file_read(ipath, INDEX_MAX_BYTES, SPEED_SUBSYS_MODEL, SPEED_FILE_READ_DEFAULT, &text, &len));
    json_error_t jerr;
    root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        if (json_error_code(&jerr) == json_error_out_of_memory) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: out of memory parsing JSON", ipath);
            status = SPEED_ERR_NO_MEMORY;
        } else {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: not valid JSON: %s at line %d column %d", ipath, jerr.text, jerr.line,
                        jerr.column);
            status = SPEED_ERR_PARSE;
        }
        goto out;
    }
    json_t *map = json_object_get(root, "weight_map");
    if (!json_is_object(map) || json_object_size(map) == 0) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: weight_map: missing, empty or not an object", ipath);
        status = SPEED_ERR_FORMAT;
        goto out;
    }
    size_t n_map = json_object_size(map);
    if (n_map > INT32_MAX) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: weight_map: too many tensors", ipath);
        status = SPEED_ERR_FORMAT;
        goto out;
    }
    shards = speed_malloc(n_map * sizeof *shards);
    if (!shards) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: out of memory", ipath);
        status = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    int n_shards = 0;
    const char *key;
    json_t *value;
    json_object_foreach(map, key, value) {
        if (!json_is_string(value) || !shard_name_ok(json_string_value(value))) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: weight_map: %s: expected a file name in the model directory", ipath,
                        key);
            status = SPEED_ERR_FORMAT;
            goto out;
        }
        int s;
        for (s = 0; s < n_shards; s++)
            if (strcmp(shards[s], json_string_value(value)) == 0) break;
        if (s == n_shards) shards[n_shards++] = json_string_value(value);
    }
    SPEED_CHECK_GOTO(files_alloc(f, n_shards, (int)n_map), status, out);
    for (int s = 0; s < n_shards; s++) {
        shard_path = speed_path_join(dir, shards[s]);
        if (!shard_path) {
            status = SPEED_ERR_NO_MEMORY;
            goto out;
        }
        struct stat sb;
        if (stat(shard_path, &sb) != 0 && errno == ENOENT) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: shard %s does not exist", ipath, shards[s]);
            status = SPEED_ERR_NOT_FOUND;
            goto out;
        }
        SPEED_CHECK_GOTO(speed_safetensors_open_flags(shard_path, f->open_flags, &f->files[s]), status, out);
        f->n_files++;
        speed_free(shard_path);
        shard_path = NULL;
    }
    int n = 0;
    json_object_foreach(map, key, value) {
        int s;
        for (s = 0; s < n_shards; s++)
            if (strcmp(shards[s], json_string_value(value)) == 0) break;
        const speed_tensor_t *t = speed_safetensors_find(f->files[s], key);
        if (!t) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: tensor %s is listed in shard %s but not found there", ipath, key,
                        shards[s]);
            status = SPEED_ERR_FORMAT;
            goto out;
        }
        f->entries[n].t = t;
        f->entries[n].file = s;
        n++;
    }
    f->n_entries = n;
    qsort(f->entries, (size_t)n, sizeof *f->entries, entry_cmp);

    for (int s = 0; s < n_shards; s++) {
        int unlisted = 0;
        for (int i = 0; i < speed_safetensors_n_tensors(f->files[s]); i++) {
            const char *name = speed_safetensors_tensor(f->files[s], i)->name;
            model_entry_t *e = entry_find(f, name);
            if (!e || e->file != s) unlisted++;
        }
        if (unlisted)
            SPEED_WARN(SPEED_SUBSYS_MODEL, "%s: %d tensors not listed for it in %s; ignored",
                       speed_safetensors_path(f->files[s]), unlisted, ipath);
    }
    status = SPEED_OK;
out:
    speed_free(shard_path);
    speed_free(shards);
    json_decref(root);
    speed_free(text);
    return status;
}

/* Finds `name`, checks its shape, marks it used. */
static speed_status_t tensor_bind(struct speed_model_files *f, const char *name, int n_dims, int64_t d0, int64_t d1,
                                  const speed_tensor_t **out_p) {
    model_entry_t *e = entry_find(f, name);
    if (!e) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: missing tensor %s", f->weights_path, name);
        return SPEED_ERR_NOT_FOUND;
    }
    const speed_tensor_t *t = e->t;
    int64_t want[2] = {d0, d1};
    bool ok = t->n_dims == n_dims;
    for (int i = 0; ok && i < n_dims; i++) ok = t->shape[i] == want[i];
    if (!ok) {
        char want_text[64], got_text[96];
        speed_tensor_shape_format(want, n_dims, want_text, sizeof want_text);
        speed_tensor_shape_format(t->shape, t->n_dims, got_text, sizeof got_text);
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s: expected %s, got %s", speed_safetensors_path(f->files[e->file]), name,
                    want_text, got_text);
        return SPEED_ERR_FORMAT;
    }
    /* dtype: the reader admits only F32/BF16/F16, all of which the engine handles. */
    e->used = true;
    *out_p = t;
    return SPEED_OK;
}

static speed_status_t model_bind(speed_model_t *m) {
    struct speed_model_files *f = m->files_;
    const speed_model_config_t *c = &m->config;
    int64_t q = (int64_t)c->n_heads * c->head_dim, kv = (int64_t)c->n_kv_heads * c->head_dim;
    char name[MAX_NAME];

    SPEED_CHECK(tensor_bind(f, "model.embed_tokens.weight", 2, c->vocab_size, c->hidden, &m->tok_embeddings));
    SPEED_CHECK(tensor_bind(f, "model.norm.weight", 1, c->hidden, 0, &m->norm));
    for (int l = 0; l < c->n_layers; l++) {
        speed_layer_weights_t *w = &m->layers[l];
        const struct {
            const char *suffix;
            int n_dims;
            int64_t d0, d1;
            const speed_tensor_t **slot;
        } specs[] = {
            {"input_layernorm", 1, c->hidden, 0, &w->attn_norm},
            {"self_attn.q_proj", 2, q, c->hidden, &w->wq},
            {"self_attn.k_proj", 2, kv, c->hidden, &w->wk},
            {"self_attn.v_proj", 2, kv, c->hidden, &w->wv},
            {"self_attn.o_proj", 2, c->hidden, q, &w->wo},
            {"post_attention_layernorm", 1, c->hidden, 0, &w->ffn_norm},
            {"mlp.gate_proj", 2, c->ffn, c->hidden, &w->w_gate},
            {"mlp.up_proj", 2, c->ffn, c->hidden, &w->w_up},
            {"mlp.down_proj", 2, c->hidden, c->ffn, &w->w_down},
        };
        for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, specs[i].suffix);
            SPEED_CHECK(tensor_bind(f, name, specs[i].n_dims, specs[i].d0, specs[i].d1, specs[i].slot));
        }
    }
    if (c->tie_word_embeddings) {
        m->lm_head = m->tok_embeddings;
        const speed_tensor_t *unused;
        /* A tied checkpoint may still carry lm_head.weight; it must at least match. */
        if (entry_find(f, "lm_head.weight"))
            SPEED_CHECK(tensor_bind(f, "lm_head.weight", 2, c->vocab_size, c->hidden, &unused));
    } else {
        SPEED_CHECK(tensor_bind(f, "lm_head.weight", 2, c->vocab_size, c->hidden, &m->lm_head));
    }
    return SPEED_OK;
}

static bool name_ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static speed_status_t model_check_extras(const speed_model_t *m, const speed_model_params_t *p) {
    const struct speed_model_files *f = m->files_;
    int n_extra = 0;
    for (int i = 0; i < f->n_entries; i++) {
        const model_entry_t *e = &f->entries[i];
        if (e->used || name_ends_with(e->t->name, "rotary_emb.inv_freq")) continue;
        const char *file = speed_safetensors_path(f->files[e->file]);
        if (!p->allow_extra_tensors) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: unexpected tensor %s", file, e->t->name);
            return SPEED_ERR_FORMAT;
        }
        if (n_extra < MAX_EXTRA_WARNINGS)
            SPEED_WARN(SPEED_SUBSYS_MODEL, "%s: unexpected tensor %s ignored", file, e->t->name);
        n_extra++;
    }
    if (n_extra > MAX_EXTRA_WARNINGS)
        SPEED_WARN(SPEED_SUBSYS_MODEL, "%s: %d more unexpected tensors ignored", f->weights_path,
                   n_extra - MAX_EXTRA_WARNINGS);
    return SPEED_OK;
}

static bool file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

speed_status_t speed_model_load(const char *dir, const speed_model_params_t *params, speed_model_t **model_p) {
    speed_model_params_t p = params ? *params : speed_model_default_params();
    speed_status_t status = SPEED_OK;
    speed_model_t *m = NULL;
    char *config_path = NULL, *index_path = NULL;

    struct stat sb;
    if (stat(dir, &sb) != 0) {
        int e = errno;
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "model dir %s: %s", dir, strerror(e));
        return e == ENOENT ? SPEED_ERR_NOT_FOUND : SPEED_ERR_IO;
    }
    if (!S_ISDIR(sb.st_mode)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "model dir %s: not a directory", dir);
        return SPEED_ERR_INVALID_ARGUMENT;
    }

    m = speed_calloc(1, sizeof *m);
    if (!m || !(m->files_ = speed_calloc(1, sizeof *m->files_))) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: out of memory", dir);
        status = SPEED_ERR_NO_MEMORY;
        goto fail;
    }
    struct speed_model_files *f = m->files_;
    f->open_flags = p.hugepages ? SPEED_SAFETENSORS_HUGEPAGES : 0;
    if (!(config_path = speed_path_join(dir, "config.json"))) {
        status = SPEED_ERR_NO_MEMORY;
        goto fail;
    }
    SPEED_CHECK_GOTO(speed_model_config_load(config_path, &m->config), status, fail);
    m->layers = speed_calloc((size_t)m->config.n_layers, sizeof *m->layers);
    if (!m->layers) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: out of memory for %d layers", dir, m->config.n_layers);
        status = SPEED_ERR_NO_MEMORY;
        goto fail;
    }

    if (!(f->weights_path = speed_path_join(dir, "model.safetensors"))) {
        status = SPEED_ERR_NO_MEMORY;
        goto fail;
    }
    if (file_exists(f->weights_path)) {
        SPEED_CHECK_GOTO(weights_open_single(f), status, fail);
    } else {
        if (!(index_path = speed_path_join(dir, "model.safetensors.index.json"))) {
            status = SPEED_ERR_NO_MEMORY;
            goto fail;
        }
        if (!file_exists(index_path)) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "model dir %s: no model.safetensors or model.safetensors.index.json", dir);
            status = SPEED_ERR_NOT_FOUND;
            goto fail;
        }
        speed_free(f->weights_path);
        f->weights_path = index_path;
        index_path = NULL;
        SPEED_CHECK_GOTO(weights_open_index(f, dir), status, fail);
    }
    SPEED_CHECK_GOTO(model_bind(m), status, fail);
    SPEED_CHECK_GOTO(model_check_extras(m, &p), status, fail);

    speed_free(config_path);
    *model_p = m;
    return SPEED_OK;

fail:
    speed_free(index_path);
    speed_free(config_path);
    speed_model_destroy(m);
    return status;
}

void speed_model_destroy(speed_model_t *model) {
    if (!model) return;
    struct speed_model_files *f = model->files_;
    if (f) {
        for (int i = 0; i < f->n_files; i++) speed_safetensors_close(f->files[i]);
        speed_free(f->files);
        speed_free(f->entries);
        speed_free(f->weights_path);
        speed_free(f);
    }
    speed_free(model->layers);
    speed_free(model);
}

const speed_tensor_t *speed_model_tensor_find(const speed_model_t *m, const char *name) {
    const model_entry_t *e = entry_find(m->files_, name);
    return e ? e->t : NULL;
}

/* Calls fn on every distinct weight the model uses. */
static void model_foreach_weight(const speed_model_t *m, void (*fn)(const speed_tensor_t *, void *), void *user) {
    fn(m->tok_embeddings, user);
    fn(m->norm, user);
    if (m->lm_head != m->tok_embeddings) fn(m->lm_head, user);
    for (int l = 0; l < m->config.n_layers; l++) {
        const speed_layer_weights_t *w = &m->layers[l];
        const speed_tensor_t *ts[] = {w->attn_norm, w->wq,     w->wk,   w->wv,    w->wo,
                                      w->ffn_norm,  w->w_gate, w->w_up, w->w_down};
        for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) fn(ts[i], user);
    }
}

static void add_params(const speed_tensor_t *t, void *user) { *(int64_t *)user += speed_tensor_n_elements(t); }

static void add_bytes(const speed_tensor_t *t, void *user) { *(size_t *)user += t->n_bytes; }

int64_t speed_model_n_params(const speed_model_t *m) {
    int64_t n = 0;
    model_foreach_weight(m, add_params, &n);
    return n;
}

size_t speed_model_n_bytes(const speed_model_t *m) {
    size_t n = 0;
    model_foreach_weight(m, add_bytes, &n);
    return n;
}
