/* Chat templates rendered in C. Each function reproduces what the Jinja template of its
 * family renders (see ../shared/data/tokenizers/{llama2,llama3}/tokenizer_config.json);
 * the family is recognised from marker strings in tokenizer_config.json's template. */
#include "tok_internal.h"

#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "log.h"
#include "names.h"

const char *const speed_chat_template_names[SPEED_CHAT_TEMPLATE_COUNT + 1] = {
    [SPEED_CHAT_TEMPLATE_AUTO] = "auto",     [SPEED_CHAT_TEMPLATE_LLAMA3] = "llama3",
    [SPEED_CHAT_TEMPLATE_LLAMA2] = "llama2", [SPEED_CHAT_TEMPLATE_CHATML] = "chatml",
    [SPEED_CHAT_TEMPLATE_COUNT] = NULL,
};

speed_status_t speed_chat_template_parse(const char *name, speed_chat_template_t *out_p) {
    if (!name || !out_p) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "speed_chat_template_parse: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    int i = speed_names_find(speed_chat_template_names, name);
    if (i >= 0) {
        *out_p = (speed_chat_template_t)i;
        return SPEED_OK;
    }
    char expected[128];
    SPEED_ERROR(SPEED_SUBSYS_TOK, "unknown chat template \"%s\" (expected %s)", name,
                speed_names_list(speed_chat_template_names, expected, sizeof expected));
    return SPEED_ERR_INVALID_ARGUMENT;
}

const char *speed_chat_template_name(speed_chat_template_t t) {
    return speed_names_get(speed_chat_template_names, SPEED_CHAT_TEMPLATE_COUNT, (int)t, "unknown");
}

/* Python's str.strip() (Jinja |trim and .strip()): Unicode whitespace at both ends. */
static void py_strip(const char **s_p, size_t *len_p) {
    const char *s = *s_p;
    size_t len = *len_p;
    while (len) {
        size_t n;
        uint32_t cp = tok_utf8_decode(s, &n);
        if (n > len || !tok_py_isspace(cp)) break;
        s += n;
        len -= n;
    }
    while (len) {
        size_t start = len - 1;
        while (start > 0 && ((unsigned char)s[start] & 0xC0) == 0x80) start--;
        size_t n;
        uint32_t cp = tok_utf8_decode(s + start, &n);
        if (start + n != len || !tok_py_isspace(cp)) break;
        len = start;
    }
    *s_p = s;
    *len_p = len;
}

/* Appends message text (stripped or not); sp (may be NULL) records where it landed, so that
 * speed_tok_chat_encode can keep special-token strings in it as text. */
static speed_status_t put_content(tok_buf_t *b, tok_spans_t *sp, const char *s, bool strip) {
    size_t len = strlen(s);
    if (strip) py_strip(&s, &len);
    size_t start = b->len;
    SPEED_CHECK(tok_buf_append(b, s, len));
    return sp && len ? tok_spans_push(sp, start, b->len) : SPEED_OK;
}

static speed_status_t put_stripped(tok_buf_t *b, tok_spans_t *sp, const char *s) { return put_content(b, sp, s, true); }

static speed_status_t render_llama3(const speed_tok_t *tok, const speed_chat_message_t *msgs, size_t n, bool gen,
                                    tok_buf_t *b, tok_spans_t *sp) {
    for (size_t i = 0; i < n; i++) {
        if (i == 0) SPEED_CHECK(tok_buf_append_str(b, tok->bos_text));
        SPEED_CHECK(tok_buf_append_str(b, "<|start_header_id|>"));
        SPEED_CHECK(tok_buf_append_str(b, msgs[i].role));
        SPEED_CHECK(tok_buf_append_str(b, "<|end_header_id|>\n\n"));
        SPEED_CHECK(put_stripped(b, sp, msgs[i].content));
        SPEED_CHECK(tok_buf_append_str(b, "<|eot_id|>"));
    }
    /* Llama 3.0's base template appends the header unconditionally. */
    if (gen || !tok->chat_honours_gen_prompt)
        SPEED_CHECK(tok_buf_append_str(b, "<|start_header_id|>assistant<|end_header_id|>\n\n"));
    return SPEED_OK;
}

static speed_status_t render_llama2(const speed_tok_t *tok, const speed_chat_message_t *msgs, size_t n, tok_buf_t *b,
                                    tok_spans_t *sp) {
    const char *system = NULL;
    if (n > 0 && strcmp(msgs[0].role, "system") == 0) {
        system = msgs[0].content;
        msgs++;
        n--;
    }
    for (size_t i = 0; i < n; i++) {
        bool user = strcmp(msgs[i].role, "user") == 0;
        if (user != (i % 2 == 0)) {
            SPEED_ERROR(SPEED_SUBSYS_TOK,
                        "llama2 chat template: after an optional system "
                        "message, roles must alternate user, assistant, user, ... (message %zu "
                        "has role \"%s\")",
                        i + (system ? 1 : 0), msgs[i].role);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        if (user) {
            SPEED_CHECK(tok_buf_append_str(b, tok->bos_text));
            SPEED_CHECK(tok_buf_append_str(b, "[INST] "));
            if (i == 0 && system) {
                /* strip() applies to the whole text: system block + first user message */
                tok_buf_t t = {0};
                speed_status_t st;
                SPEED_CHECK_GOTO(tok_buf_append_str(&t, "<<SYS>>\n"), st, sys_out);
                SPEED_CHECK_GOTO(tok_buf_append_str(&t, system), st, sys_out);
                SPEED_CHECK_GOTO(tok_buf_append_str(&t, "\n<</SYS>>\n\n"), st, sys_out);
                SPEED_CHECK_GOTO(tok_buf_append_str(&t, msgs[i].content), st, sys_out);
                /* The <<SYS>> markers are plain text in Llama 2: the whole block is content. */
                SPEED_CHECK_GOTO(put_stripped(b, sp, t.p), st, sys_out);
            sys_out:
                tok_buf_free(&t);
                SPEED_CHECK(st);
            } else {
                SPEED_CHECK(put_stripped(b, sp, msgs[i].content));
            }
            SPEED_CHECK(tok_buf_append_str(b, " [/INST]"));
        } else {
            SPEED_CHECK(tok_buf_putc(b, ' '));
            SPEED_CHECK(put_stripped(b, sp, msgs[i].content));
            SPEED_CHECK(tok_buf_putc(b, ' '));
            SPEED_CHECK(tok_buf_append_str(b, tok->eos_text));
        }
    }
    return SPEED_OK;
}

static speed_status_t render_chatml(const speed_chat_message_t *msgs, size_t n, bool gen, tok_buf_t *b,
                                    tok_spans_t *sp) {
    for (size_t i = 0; i < n; i++) {
        SPEED_CHECK(tok_buf_append_str(b, "<|im_start|>"));
        SPEED_CHECK(tok_buf_append_str(b, msgs[i].role));
        SPEED_CHECK(tok_buf_putc(b, '\n'));
        SPEED_CHECK(put_content(b, sp, msgs[i].content, false));
        SPEED_CHECK(tok_buf_append_str(b, "<|im_end|>\n"));
    }
    if (gen) SPEED_CHECK(tok_buf_append_str(b, "<|im_start|>assistant\n"));
    return SPEED_OK;
}

static speed_status_t chat_render(const speed_tok_t *tok, const speed_chat_message_t *msgs, size_t n_msgs,
                                  bool add_generation_prompt, tok_buf_t *b_out, tok_spans_t *sp) {
    if (!tok || !b_out || (!msgs && n_msgs)) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "speed_tok_chat_render: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    for (size_t i = 0; i < n_msgs; i++) {
        if (!msgs[i].role || !msgs[i].content) {
            SPEED_ERROR(SPEED_SUBSYS_TOK, "chat message %zu has no %s", i, msgs[i].role ? "content" : "role");
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    }
    if (tok->chat_template == SPEED_CHAT_TEMPLATE_AUTO) {
        SPEED_ERROR(SPEED_SUBSYS_TOK,
                    "%s; name a built-in one (llama3, llama2, chatml) in the "
                    "configuration",
                    tok->has_chat_template ? "the chat_template in tokenizer_config.json is not one this server "
                                             "recognises"
                                           : "the tokenizer has no chat_template");
        return SPEED_ERR_UNSUPPORTED;
    }
    tok_buf_t b = {0};
    speed_status_t st = tok_buf_reserve(&b, 256);
    if (st == SPEED_OK) {
        b.p[0] = '\0';
        switch (tok->chat_template) {
        case SPEED_CHAT_TEMPLATE_LLAMA3: st = render_llama3(tok, msgs, n_msgs, add_generation_prompt, &b, sp); break;
        case SPEED_CHAT_TEMPLATE_LLAMA2: st = render_llama2(tok, msgs, n_msgs, &b, sp); break;
        case SPEED_CHAT_TEMPLATE_CHATML: st = render_chatml(msgs, n_msgs, add_generation_prompt, &b, sp); break;
        default: st = SPEED_ERR_INTERNAL; break;
        }
    }
    if (st != SPEED_OK) {
        tok_buf_free(&b);
        if (st == SPEED_ERR_NO_MEMORY)
            SPEED_ERROR(SPEED_SUBSYS_TOK, "out of memory rendering a chat of %zu messages", n_msgs);
        return st;
    }
    *b_out = b;
    return SPEED_OK;
}

speed_status_t speed_tok_chat_render(const speed_tok_t *tok, const speed_chat_message_t *msgs, size_t n_msgs,
                                     bool add_generation_prompt, char **text_p) {
    if (!text_p) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "speed_tok_chat_render: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    tok_buf_t b = {0};
    SPEED_CHECK(chat_render(tok, msgs, n_msgs, add_generation_prompt, &b, NULL));
    *text_p = b.p;
    return SPEED_OK;
}

speed_status_t speed_tok_chat_encode(const speed_tok_t *tok, const speed_chat_message_t *msgs, size_t n_msgs,
                                     bool add_generation_prompt, bool content_specials, speed_tok_ids_t *out) {
    if (!out) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "speed_tok_chat_encode: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    tok_buf_t b = {0};
    tok_spans_t sp = {0};
    speed_status_t st = chat_render(tok, msgs, n_msgs, add_generation_prompt, &b, content_specials ? NULL : &sp);
    if (st == SPEED_OK) st = tok_encode_spans(tok, b.p, b.len, false, sp.v, sp.n, out);
    tok_buf_free(&b);
    tok_spans_free(&sp);
    return st;
}
