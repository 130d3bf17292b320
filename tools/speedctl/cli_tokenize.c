/* speedctl tokenize: text → ids, ids → text, chat template rendering, bulk JSONL. */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "log.h"
#include "speedctl.h"
#include "tokenizer.h"

typedef struct {
    char *model, *text, *file, *jsonl, *decode;
    speedctl_chat_opts_t chat; /* --chat, --system, --chat-template (speedctl.h) */
    bool add_special, skip_special, json;
} tok_opts_t;

/* tokenize's own options; tok_parts puts the table together. */
static const speed_config_field_t tok_input_fields[] = {
    SPEEDCTL_TEXT_OPT(tok_opts_t, "model", model, "model directory holding tokenizer.json (required)"),
    SPEEDCTL_TEXT_OPT(tok_opts_t, "text", text, "text to encode"),
    SPEEDCTL_TEXT_OPT(tok_opts_t, "file", file, "encode the contents of this file"),
    SPEEDCTL_TEXT_OPT(tok_opts_t, "jsonl", jsonl,
                      "encode each {\"text\": ...} line of this file; prints one {\"ids\": [...]} line each"),
    SPEEDCTL_TEXT_OPT(tok_opts_t, "decode", decode, "comma-separated ids to decode back to text"),
};
static const speed_config_field_t tok_fields[] = {
    {"add_special", SPEED_CONFIG_BOOL, offsetof(tok_opts_t, add_special), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "add the tokenizer's special tokens (BOS) as the model's post-processor says"},
    {"skip_special", SPEED_CONFIG_BOOL, offsetof(tok_opts_t, skip_special), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "--decode: leave special tokens out of the text"},
    {"json", SPEED_CONFIG_BOOL, offsetof(tok_opts_t, json), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "print JSON: {\"ids\": [...]} (or {\"text\": ...} for --decode)"},
};
static const speedctl_options_part_t tok_parts[] = {
    SPEEDCTL_OWN_PART(tok_input_fields),
    SPEEDCTL_CHAT_PART(tok_opts_t, chat),
    SPEEDCTL_OWN_PART(tok_fields),
};

static void ids_print(const speed_tok_ids_t *ids, bool json, FILE *f) {
    fputs(json ? "{\"ids\": [" : "", f);
    for (size_t i = 0; i < ids->n; i++) fprintf(f, i ? (json ? ", %d" : " %d") : "%d", ids->ids[i]);
    fputs(json ? "]}\n" : "\n", f);
}

/* Prints `text` as a JSON string value (valid UTF-8 assumed, NULs kept). */
static void json_string_print(const char *text, size_t len, FILE *f) {
    json_t *s = json_stringn_nocheck(text, len);
    char *out = s ? json_dumps(s, JSON_ENCODE_ANY) : NULL;
    fputs(out ? out : "null", f);
    free(out);
    json_decref(s);
}

/* One {"ids": [...]} (or {"error": ...}) line per input line; returns the number of bad lines. */
static long jsonl_run(const speed_tok_t *tok, const char *path, bool add_special, speed_status_t *st_p) {
    char *data = NULL;
    size_t len = 0;
    *st_p = speedctl_read_file(path, &data, &len);
    if (*st_p != SPEED_OK) return 0;
    long bad = 0, line_no = 0;
    speed_tok_ids_t ids = {0};
    for (size_t at = 0; at < len;) {
        size_t eol = at;
        while (eol < len && data[eol] != '\n') eol++;
        line_no++;
        size_t line_len = eol - at;
        if (line_len && data[at + line_len - 1] == '\r') line_len--;
        if (line_len > 0) {
            json_error_t jerr;
            json_t *obj = json_loadb(data + at, line_len, JSON_ALLOW_NUL, &jerr);
            json_t *text = obj ? json_object_get(obj, "text") : NULL;
            const char *why = NULL;
            char msg[512];
            if (!obj) {
                snprintf(msg, sizeof msg, "line %ld: invalid JSON: %s", line_no, jerr.text);
                why = msg;
            } else if (!json_is_string(text)) {
                snprintf(msg, sizeof msg, "line %ld: expected an object with a string \"text\"", line_no);
                why = msg;
            } else {
                ids.n = 0;
                if (speed_tok_encode(tok, json_string_value(text), json_string_length(text), add_special, &ids) ==
                    SPEED_OK) {
                    ids_print(&ids, true, stdout);
                } else {
                    snprintf(msg, sizeof msg, "line %ld: %s", line_no, speed_log_last_error());
                    why = msg;
                }
            }
            if (why) {
                bad++;
                printf("{\"error\": ");
                json_string_print(why, strlen(why), stdout);
                printf("}\n");
            }
            json_decref(obj);
        }
        at = eol + 1;
    }
    speed_tok_ids_free(&ids);
    speed_free(data);
    return bad;
}

static const char tok_usage[] =
    "speedctl tokenize --model DIR (--text T | --file F | --jsonl F | --decode 1,2,3 | --chat MSG) [options]";

int speedctl_tokenize(int argc, char **argv) {
    tok_opts_t o;
    speedctl_options_t opts;
    if (!speedctl_options_begin(&opts, "tokenize", tok_usage, tok_parts, SPEEDCTL_N_PARTS(tok_parts), &o, argc, argv))
        return opts.exit_code;
    speed_config_t *cfg = opts.cfg;
    char *const *pos;
    int n_inputs = !!o.text + !!o.file + !!o.jsonl + !!o.decode + !!o.chat.chat;
    if (speed_config_positional(cfg, &pos) != 0 || !o.model || n_inputs != 1) {
        speedctl_fail("tokenize needs --model DIR and exactly one of --text, --file, --jsonl, --decode, --chat");
        speed_config_destroy(cfg);
        return SPEEDCTL_EXIT_USAGE;
    }

    speed_tok_t *tok = NULL;
    speed_tok_ids_t ids = {0};
    char *buf = NULL;
    size_t len = 0;
    speed_status_t st;
    speed_tok_params_t tp = speed_tok_default_params();
    tp.chat_template = (speed_chat_template_t)o.chat.chat_template;
    SPEED_CHECK_GOTO(speed_tok_load(o.model, &tp, &tok), st, out);

    if (o.text || o.file) {
        if (o.file) SPEED_CHECK_GOTO(speedctl_read_file(o.file, &buf, &len), st, out);
        const char *text = o.text ? o.text : buf;
        SPEED_CHECK_GOTO(speed_tok_encode(tok, text, o.text ? strlen(text) : len, o.add_special, &ids), st, out);
        ids_print(&ids, o.json, stdout);
    } else if (o.decode) {
        SPEED_CHECK_GOTO(speedctl_ids_parse("--decode", o.decode, speed_tok_vocab_size(tok), &ids), st, out);
        SPEED_CHECK_GOTO(speed_tok_decode(tok, ids.ids, ids.n, o.skip_special, &buf, &len), st, out);
        if (o.json) {
            printf("{\"text\": ");
            json_string_print(buf, len, stdout);
            printf("}\n");
        } else {
            fwrite(buf, 1, len, stdout);
            putchar('\n');
        }
    } else if (o.chat.chat) {
        SPEED_CHECK_GOTO(speedctl_chat_encode(&o.chat, tok, &buf, &ids), st, out);
        len = strlen(buf);
        if (o.json) {
            printf("{\"text\": ");
            json_string_print(buf, len, stdout);
            printf(", \"ids\": [");
            for (size_t i = 0; i < ids.n; i++) printf(i ? ", %d" : "%d", ids.ids[i]);
            printf("]}\n");
        } else {
            printf("%s\n", buf);
            ids_print(&ids, false, stdout);
        }
    } else {
        long bad = jsonl_run(tok, o.jsonl, o.add_special, &st);
        if (st == SPEED_OK && bad) {
            speedctl_fail("%s: %ld line%s could not be encoded (see the \"error\" lines)", o.jsonl, bad,
                          bad == 1 ? "" : "s");
            st = SPEED_ERR_INVALID_ARGUMENT;
        }
    }
out:
    speed_free(buf);
    speed_tok_ids_free(&ids);
    speed_tok_destroy(tok);
    speed_config_destroy(cfg);
    return st == SPEED_OK ? SPEEDCTL_EXIT_OK : SPEEDCTL_EXIT_FAIL;
}
