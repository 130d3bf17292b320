/* tokenizer_config.json: bos/eos tokens, add_bos_token/add_eos_token and the chat template;
 * also speed_tok_token_id. */
#include "tok_loader.h"

#include <jansson.h>
#include <string.h>

/* ---- tokenizer_config.json ------------------------------------------------------------- */

int32_t speed_tok_token_id(const speed_tok_t *tok, const char *text, size_t len) {
    if (!tok || !text) return -1;
    for (size_t i = 0; i < tok->n_added; i++) {
        const tok_added_t *a = &tok->added[i];
        if (a->len == len && memcmp(tok->strs + a->off, text, len) == 0) return a->id;
    }
    return tok_vocab_find(tok, text, len);
}

/* "bos_token": "<s>" or {"content": "<s>", ...} or null. */
static speed_status_t config_token(const tok_loader_t *ld, const json_t *cfg, const char *key, const char **s_p) {
    json_t *v = json_object_get(cfg, key);
    *s_p = NULL;
    if (!v || json_is_null(v)) return SPEED_OK;
    if (json_is_object(v)) v = json_object_get(v, "content");
    if (!json_is_string(v))
        return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "\"%s\" must be a string or {\"content\": string}", key);
    *s_p = json_string_value(v);
    return SPEED_OK;
}

static void eos_add(speed_tok_t *tok, int32_t id) {
    if (id < 0 || tok->n_eos == sizeof tok->eos_ids / sizeof tok->eos_ids[0]) return;
    for (size_t i = 0; i < tok->n_eos; i++)
        if (tok->eos_ids[i] == id) return;
    tok->eos_ids[tok->n_eos++] = id;
}

static speed_chat_template_t recognise_template(const char *t, bool *gen_p) {
    *gen_p = strstr(t, "add_generation_prompt") != NULL;
    if (strstr(t, "<|start_header_id|>") && strstr(t, "<|end_header_id|>") && strstr(t, "<|eot_id|>"))
        return SPEED_CHAT_TEMPLATE_LLAMA3;
    if (strstr(t, "<|im_start|>") && strstr(t, "<|im_end|>")) return SPEED_CHAT_TEMPLATE_CHATML;
    if (strstr(t, "[INST]") && strstr(t, "[/INST]") && strstr(t, "<<SYS>>")) return SPEED_CHAT_TEMPLATE_LLAMA2;
    return SPEED_CHAT_TEMPLATE_AUTO;
}

speed_status_t speed_tok_config_load(const tok_loader_t *ld, const json_t *cfg, const speed_tok_params_t *params) {
    speed_tok_t *tok = ld->tok;
    const char *bos = NULL, *eos = NULL;
    bool has_add_bos = false, has_add_eos = false, add_bos = false, add_eos = false;
    const char *tmpl = NULL;
    if (cfg) {
        SPEED_CHECK(config_token(ld, cfg, "bos_token", &bos));
        SPEED_CHECK(config_token(ld, cfg, "eos_token", &eos));
        json_t *v;
        if ((v = json_object_get(cfg, "add_bos_token")) && !json_is_null(v)) {
            SPEED_CHECK(speed_tok_json_bool(ld, cfg, "tokenizer_config", "add_bos_token", false, &add_bos));
            has_add_bos = true;
        }
        if ((v = json_object_get(cfg, "add_eos_token")) && !json_is_null(v)) {
            SPEED_CHECK(speed_tok_json_bool(ld, cfg, "tokenizer_config", "add_eos_token", false, &add_eos));
            has_add_eos = true;
        }
        v = json_object_get(cfg, "chat_template");
        if (json_is_string(v)) {
            tmpl = json_string_value(v);
        } else if (json_is_array(v)) { /* [{"name": "default", "template": "..."}, ...] */
            size_t i;
            json_t *e;
            json_array_foreach(v, i, e) {
                json_t *name = json_object_get(e, "name"), *t = json_object_get(e, "template");
                if (json_is_string(name) && json_is_string(t) && strcmp(json_string_value(name), "default") == 0)
                    tmpl = json_string_value(t);
            }
        } else if (v && !json_is_null(v)) {
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "\"chat_template\" must be a string");
        }
    }
    tok->bos_id = bos ? speed_tok_token_id(tok, bos, strlen(bos)) : -1;
    if (bos && tok->bos_id < 0)
        return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "bos_token \"%s\" is not in the vocabulary", bos);
    if (!bos && tok->n_prefix == 1) {
        tok->bos_id = tok->prefix_ids[0];
        bos = speed_tok_token_text(tok, tok->bos_id);
    }
    int32_t eos_id = eos ? speed_tok_token_id(tok, eos, strlen(eos)) : -1;
    if (eos && eos_id < 0)
        return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "eos_token \"%s\" is not in the vocabulary", eos);
    if (!eos) {
        static const char *const fallback[] = {"</s>", "<|endoftext|>", "<|end_of_text|>"};
        for (size_t i = 0; i < 3 && eos_id < 0; i++) {
            eos_id = speed_tok_token_id(tok, fallback[i], strlen(fallback[i]));
            if (eos_id >= 0) eos = fallback[i];
        }
    }
    eos_add(tok, eos_id);
    static const char *const turn_ends[] = {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_text|>",
                                            "<|endoftext|>"};
    for (size_t i = 0; i < sizeof turn_ends / sizeof turn_ends[0]; i++) {
        int32_t id = speed_tok_token_id(tok, turn_ends[i], strlen(turn_ends[i]));
        if (id >= 0 && (tok->entries[id].flags & TOK_ENTRY_ADDED)) eos_add(tok, id);
    }
    if (has_add_bos) {
        if (add_bos && tok->bos_id < 0)
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "add_bos_token is true but there is no bos_token");
        /* The config overrides the post-processor, as LlamaTokenizerFast does. */
        if (add_bos && !(tok->n_prefix == 1 && tok->prefix_ids[0] == tok->bos_id)) {
            tok->prefix_ids[0] = tok->bos_id;
            tok->n_prefix = 1;
        } else if (!add_bos) {
            tok->n_prefix = 0;
        }
    }
    if (has_add_eos) {
        if (add_eos && eos_id < 0)
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "add_eos_token is true but there is no eos_token");
        tok->n_suffix = 0;
        if (add_eos) tok->suffix_ids[tok->n_suffix++] = eos_id;
    }
    if (speed_tok_bytes_dup(bos ? bos : "", bos ? strlen(bos) : 0, &tok->bos_text) != SPEED_OK ||
        speed_tok_bytes_dup(eos ? eos : "", eos ? strlen(eos) : 0, &tok->eos_text) != SPEED_OK)
        return speed_tok_loader_oom(ld);

    bool gen = false;
    tok->has_chat_template = tmpl != NULL;
    speed_chat_template_t found = tmpl ? recognise_template(tmpl, &gen) : SPEED_CHAT_TEMPLATE_AUTO;
    if (params->chat_template != SPEED_CHAT_TEMPLATE_AUTO) {
        tok->chat_template = params->chat_template;
        /* A named template behaves like the template family's instruct version. */
        tok->chat_honours_gen_prompt = found == params->chat_template ? gen : true;
    } else {
        tok->chat_template = found;
        tok->chat_honours_gen_prompt = gen;
    }
    return SPEED_OK;
}
