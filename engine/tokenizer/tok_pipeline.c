/* Reading the steps around the BPE model from tokenizer.json: normalizer, pre-tokenizer,
 * decoder and post-processor, into the tables tok_encode.c and tok_decode.c run. */
#include "tok_loader.h"

#include <jansson.h>
#include <string.h>

#include "alloc.h"
#include "log.h"

/* ---- normalizer / pre-tokenizer / decoder -------------------------------------------------- */

static speed_status_t grow_array(void **arr, size_t n, size_t elem) {
    void *p = speed_realloc(*arr, (n + 1) * elem);
    if (!p) return SPEED_ERR_NO_MEMORY;
    *arr = p;
    return SPEED_OK;
}

speed_status_t speed_tok_normalizer_load(const tok_loader_t *ld, const json_t *n, int depth) {
    speed_tok_t *tok = ld->tok;
    if (!n || json_is_null(n)) return SPEED_OK;
    if (!json_is_object(n) || depth > 8)
        return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "normalizer is not an object");
    const char *type = speed_tok_json_type(n);
    if (!type) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "normalizer has no \"type\"");
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(n, "normalizers");
        if (!json_is_array(list))
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "Sequence normalizer has no \"normalizers\" array");
        size_t i;
        json_t *v;
        json_array_foreach(list, i, v) SPEED_CHECK(speed_tok_normalizer_load(ld, v, depth + 1));
        return SPEED_OK;
    }
    if (strcmp(type, "NFC") == 0) {
        /* NFC is the identity on text that is already composed, which is nearly all text
         * a server sees; decomposed input is not recomposed (see README). */
        SPEED_WARN(SPEED_SUBSYS_TOK, "%s: NFC normalizer treated as identity", ld->path);
        return SPEED_OK;
    }
    tok_norm_t nm = {0};
    const char *s, *c;
    size_t slen, clen;
    if (strcmp(type, "Prepend") == 0) {
        nm.type = TOK_NORM_PREPEND;
        SPEED_CHECK(speed_tok_json_str(ld, n, "Prepend normalizer", "prepend", &s, &slen));
        if (!s) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "Prepend normalizer has no \"prepend\"");
        if (speed_tok_bytes_dup(s, slen, &nm.a) != SPEED_OK) return speed_tok_loader_oom(ld);
        nm.a_len = slen;
    } else if (strcmp(type, "Replace") == 0) {
        bool regex = false;
        nm.type = TOK_NORM_REPLACE;
        SPEED_CHECK(speed_tok_json_pattern(ld, n, "Replace normalizer", &s, &slen, &regex));
        if (regex)
            return speed_tok_loader_fail(ld, SPEED_ERR_UNSUPPORTED,
                                         "Replace normalizer with a Regex pattern is "
                                         "not supported");
        if (slen == 0) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "Replace normalizer has an empty pattern");
        SPEED_CHECK(speed_tok_json_str(ld, n, "Replace normalizer", "content", &c, &clen));
        if (!c) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "Replace normalizer has no \"content\"");
        if (speed_tok_bytes_dup(s, slen, &nm.a) != SPEED_OK) return speed_tok_loader_oom(ld);
        if (speed_tok_bytes_dup(c, clen, &nm.b) != SPEED_OK) {
            speed_free(nm.a);
            return speed_tok_loader_oom(ld);
        }
        nm.a_len = slen;
        nm.b_len = clen;
    } else {
        return speed_tok_loader_fail(ld, SPEED_ERR_UNSUPPORTED,
                                     "normalizer type \"%s\" is not supported "
                                     "(supported: Sequence, Prepend, Replace, NFC)",
                                     type);
    }
    if (grow_array((void **)&tok->norms, tok->n_norms, sizeof *tok->norms) != SPEED_OK) {
        speed_free(nm.a);
        speed_free(nm.b);
        return speed_tok_loader_oom(ld);
    }
    tok->norms[tok->n_norms++] = nm;
    return SPEED_OK;
}

#define GPT2_REGEX "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

static speed_status_t metaspace_common(const tok_loader_t *ld, const json_t *p, const char *ctx, char *repl,
                                       size_t *repl_len, tok_prepend_t *prepend) {
    const char *s;
    size_t slen;
    SPEED_CHECK(speed_tok_json_str(ld, p, ctx, "replacement", &s, &slen));
    if (!s) {
        s = "\xE2\x96\x81";
        slen = 3;
    }
    if (slen == 0 || slen > 4 || tok_utf8_char_len((unsigned char)s[0]) != slen)
        return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "%s: \"replacement\" must be one character", ctx);
    memcpy(repl, s, slen);
    repl[slen] = '\0';
    *repl_len = slen;
    const char *scheme;
    SPEED_CHECK(speed_tok_json_str(ld, p, ctx, "prepend_scheme", &scheme, NULL));
    if (scheme) {
        if (strcmp(scheme, "always") == 0)
            *prepend = TOK_PREPEND_ALWAYS;
        else if (strcmp(scheme, "first") == 0)
            *prepend = TOK_PREPEND_FIRST;
        else if (strcmp(scheme, "never") == 0)
            *prepend = TOK_PREPEND_NEVER;
        else
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "%s: unknown prepend_scheme \"%s\"", ctx, scheme);
    } else {
        bool aps = true;
        SPEED_CHECK(speed_tok_json_bool(ld, p, ctx, "add_prefix_space", true, &aps));
        *prepend = aps ? TOK_PREPEND_ALWAYS : TOK_PREPEND_NEVER;
    }
    return SPEED_OK;
}

speed_status_t speed_tok_pre_tokenizer_load(const tok_loader_t *ld, const json_t *p, int depth) {
    speed_tok_t *tok = ld->tok;
    if (!p || json_is_null(p)) return SPEED_OK;
    if (!json_is_object(p) || depth > 8)
        return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "pre_tokenizer is not an object");
    const char *type = speed_tok_json_type(p);
    if (!type) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "pre_tokenizer has no \"type\"");
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(p, "pretokenizers");
        if (!json_is_array(list))
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "Sequence pre_tokenizer has no \"pretokenizers\" array");
        size_t i;
        json_t *v;
        json_array_foreach(list, i, v) SPEED_CHECK(speed_tok_pre_tokenizer_load(ld, v, depth + 1));
        return SPEED_OK;
    }
    if (tok->byte_level)
        return speed_tok_loader_fail(ld, SPEED_ERR_UNSUPPORTED,
                                     "pre_tokenizer \"%s\" after ByteLevel is not "
                                     "supported",
                                     type);
    tok_pre_t pre = {0};
    speed_status_t st;
    if (strcmp(type, "Split") == 0) {
        const char *s;
        size_t slen;
        bool regex = false, invert = false;
        pre.type = TOK_PRE_SPLIT;
        SPEED_CHECK(speed_tok_json_pattern(ld, p, "Split pre_tokenizer", &s, &slen, &regex));
        SPEED_CHECK(speed_tok_json_bool(ld, p, "Split pre_tokenizer", "invert", false, &invert));
        if (invert)
            return speed_tok_loader_fail(ld, SPEED_ERR_UNSUPPORTED, "Split pre_tokenizer with invert is not supported");
        const char *beh;
        SPEED_CHECK(speed_tok_json_str(ld, p, "Split pre_tokenizer", "behavior", &beh, NULL));
        if (!beh) beh = "Isolated";
        if (strcmp(beh, "Isolated") == 0)
            pre.behavior = TOK_SPLIT_ISOLATED;
        else if (strcmp(beh, "Removed") == 0)
            pre.behavior = TOK_SPLIT_REMOVED;
        else if (strcmp(beh, "MergedWithPrevious") == 0)
            pre.behavior = TOK_SPLIT_MERGED_PREV;
        else if (strcmp(beh, "MergedWithNext") == 0)
            pre.behavior = TOK_SPLIT_MERGED_NEXT;
        else if (strcmp(beh, "Contiguous") == 0)
            pre.behavior = TOK_SPLIT_CONTIGUOUS;
        else
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "Split pre_tokenizer: unknown behavior \"%s\"", beh);
        if (slen == 0) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "Split pre_tokenizer has an empty pattern");
        st = tok_regex_compile(tok->gctx, s, slen, !regex, ld->path, &pre.re);
        if (st == SPEED_ERR_NO_MEMORY) return speed_tok_loader_oom(ld);
        SPEED_CHECK(st);
    } else if (strcmp(type, "ByteLevel") == 0) {
        pre.type = TOK_PRE_BYTELEVEL;
        SPEED_CHECK(
            speed_tok_json_bool(ld, p, "ByteLevel pre_tokenizer", "add_prefix_space", true, &pre.add_prefix_space));
        SPEED_CHECK(speed_tok_json_bool(ld, p, "ByteLevel pre_tokenizer", "use_regex", true, &pre.use_regex));
        if (pre.use_regex) {
            st = tok_regex_compile(tok->gctx, GPT2_REGEX, strlen(GPT2_REGEX), false, ld->path, &pre.re);
            if (st == SPEED_ERR_NO_MEMORY) return speed_tok_loader_oom(ld);
            SPEED_CHECK(st);
        }
        tok->byte_level = true;
    } else if (strcmp(type, "Metaspace") == 0) {
        pre.type = TOK_PRE_METASPACE;
        SPEED_CHECK(metaspace_common(ld, p, "Metaspace pre_tokenizer", pre.repl, &pre.repl_len, &pre.prepend));
        SPEED_CHECK(speed_tok_json_bool(ld, p, "Metaspace pre_tokenizer", "split", true, &pre.split));
    } else {
        return speed_tok_loader_fail(ld, SPEED_ERR_UNSUPPORTED,
                                     "pre_tokenizer type \"%s\" is not supported "
                                     "(supported: Sequence, Split, ByteLevel, Metaspace)",
                                     type);
    }
    if (grow_array((void **)&tok->pres, tok->n_pres, sizeof *tok->pres) != SPEED_OK) {
        tok_regex_free(&pre.re);
        return speed_tok_loader_oom(ld);
    }
    tok->pres[tok->n_pres++] = pre;
    return SPEED_OK;
}

speed_status_t speed_tok_decoder_load(const tok_loader_t *ld, const json_t *d, int depth) {
    speed_tok_t *tok = ld->tok;
    if (!d || json_is_null(d)) return SPEED_OK;
    if (!json_is_object(d) || depth > 8) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "decoder is not an object");
    const char *type = speed_tok_json_type(d);
    if (!type) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "decoder has no \"type\"");
    tok->has_decoder = true;
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(d, "decoders");
        if (!json_is_array(list))
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "Sequence decoder has no \"decoders\" array");
        size_t i;
        json_t *v;
        json_array_foreach(list, i, v) SPEED_CHECK(speed_tok_decoder_load(ld, v, depth + 1));
        return SPEED_OK;
    }
    tok_dec_t dec = {0};
    const char *s, *c;
    size_t slen, clen;
    if (strcmp(type, "ByteLevel") == 0) {
        dec.type = TOK_DEC_BYTELEVEL;
    } else if (strcmp(type, "ByteFallback") == 0) {
        dec.type = TOK_DEC_BYTEFALLBACK;
    } else if (strcmp(type, "Fuse") == 0) {
        dec.type = TOK_DEC_FUSE;
    } else if (strcmp(type, "Replace") == 0) {
        bool regex = false;
        dec.type = TOK_DEC_REPLACE;
        SPEED_CHECK(speed_tok_json_pattern(ld, d, "Replace decoder", &s, &slen, &regex));
        if (regex)
            return speed_tok_loader_fail(ld, SPEED_ERR_UNSUPPORTED,
                                         "Replace decoder with a Regex pattern is not "
                                         "supported");
        if (slen == 0) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "Replace decoder has an empty pattern");
        SPEED_CHECK(speed_tok_json_str(ld, d, "Replace decoder", "content", &c, &clen));
        if (!c) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "Replace decoder has no \"content\"");
        if (speed_tok_bytes_dup(s, slen, &dec.a) != SPEED_OK) return speed_tok_loader_oom(ld);
        if (speed_tok_bytes_dup(c, clen, &dec.b) != SPEED_OK) {
            speed_free(dec.a);
            return speed_tok_loader_oom(ld);
        }
        dec.a_len = slen;
        dec.b_len = clen;
    } else if (strcmp(type, "Strip") == 0) {
        dec.type = TOK_DEC_STRIP;
        SPEED_CHECK(speed_tok_json_str(ld, d, "Strip decoder", "content", &s, &slen));
        json_t *start = json_object_get(d, "start"), *stop = json_object_get(d, "stop");
        if (!s || slen == 0 || tok_utf8_char_len((unsigned char)s[0]) != slen || !json_is_integer(start) ||
            !json_is_integer(stop) || json_integer_value(start) < 0 || json_integer_value(stop) < 0 ||
            json_integer_value(start) > 1000 || json_integer_value(stop) > 1000)
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT,
                                         "Strip decoder needs a one-character \"content\" "
                                         "and integer \"start\"/\"stop\"");
        if (speed_tok_bytes_dup(s, slen, &dec.a) != SPEED_OK) return speed_tok_loader_oom(ld);
        dec.a_len = slen;
        dec.start = (int)json_integer_value(start);
        dec.stop = (int)json_integer_value(stop);
    } else if (strcmp(type, "Metaspace") == 0) {
        char repl[8];
        size_t rlen;
        tok_prepend_t prepend;
        dec.type = TOK_DEC_METASPACE;
        SPEED_CHECK(metaspace_common(ld, d, "Metaspace decoder", repl, &rlen, &prepend));
        if (speed_tok_bytes_dup(repl, rlen, &dec.a) != SPEED_OK) return speed_tok_loader_oom(ld);
        dec.a_len = rlen;
        dec.prepend = prepend != TOK_PREPEND_NEVER;
    } else {
        return speed_tok_loader_fail(ld, SPEED_ERR_UNSUPPORTED,
                                     "decoder type \"%s\" is not supported (supported: "
                                     "Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace)",
                                     type);
    }
    if (grow_array((void **)&tok->decs, tok->n_decs, sizeof *tok->decs) != SPEED_OK) {
        speed_free(dec.a);
        speed_free(dec.b);
        return speed_tok_loader_oom(ld);
    }
    tok->decs[tok->n_decs++] = dec;
    return SPEED_OK;
}

/* TemplateProcessing "single": special tokens before $A go in front, after it behind. */
static speed_status_t load_template(const tok_loader_t *ld, const json_t *pp) {
    speed_tok_t *tok = ld->tok;
    json_t *single = json_object_get(pp, "single");
    json_t *specials = json_object_get(pp, "special_tokens");
    if (!json_is_array(single))
        return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "TemplateProcessing has no \"single\" array");
    bool seen_a = false;
    size_t i;
    json_t *v;
    json_array_foreach(single, i, v) {
        json_t *sp = json_object_get(v, "SpecialToken");
        if (json_object_get(v, "Sequence")) {
            seen_a = true;
            continue;
        }
        json_t *name = json_object_get(sp, "id");
        if (!json_is_string(name))
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT,
                                         "TemplateProcessing.single[%zu] is neither "
                                         "SpecialToken nor Sequence",
                                         i);
        json_t *ids = json_object_get(json_object_get(specials, json_string_value(name)), "ids");
        if (!json_is_array(ids))
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT,
                                         "TemplateProcessing: special token \"%s\" has no "
                                         "ids",
                                         json_string_value(name));
        size_t k;
        json_t *idv;
        json_array_foreach(ids, k, idv) {
            json_int_t id = json_integer_value(idv);
            if (!json_is_integer(idv) || id < 0 || id >= tok->n_vocab)
                return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT,
                                             "TemplateProcessing: special token \"%s\" has "
                                             "an id outside the vocabulary",
                                             json_string_value(name));
            int32_t *arr = seen_a ? tok->suffix_ids : tok->prefix_ids;
            size_t *n = seen_a ? &tok->n_suffix : &tok->n_prefix;
            if (*n == 4)
                return speed_tok_loader_fail(ld, SPEED_ERR_UNSUPPORTED,
                                             "TemplateProcessing adds more than 4 "
                                             "tokens on one side");
            arr[(*n)++] = (int32_t)id;
        }
    }
    return SPEED_OK;
}

speed_status_t speed_tok_post_processor_load(const tok_loader_t *ld, const json_t *pp, int depth) {
    if (!pp || json_is_null(pp)) return SPEED_OK;
    const char *type = json_is_object(pp) ? speed_tok_json_type(pp) : NULL;
    if (!type || depth > 8) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "post_processor has no \"type\"");
    if (strcmp(type, "ByteLevel") == 0) return SPEED_OK; /* offsets only */
    if (strcmp(type, "TemplateProcessing") == 0) return load_template(ld, pp);
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(pp, "processors");
        if (!json_is_array(list))
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "Sequence post_processor has no \"processors\" array");
        size_t i;
        json_t *v;
        json_array_foreach(list, i, v) SPEED_CHECK(speed_tok_post_processor_load(ld, v, depth + 1));
        return SPEED_OK;
    }
    return speed_tok_loader_fail(ld, SPEED_ERR_UNSUPPORTED,
                                 "post_processor type \"%s\" is not supported "
                                 "(supported: TemplateProcessing, ByteLevel, Sequence)",
                                 type);
}
