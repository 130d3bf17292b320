/* kv.dtype auto (the default) through a real 1P1D cluster, on an f32 and on an f16 model: the
 * prefill and the decode node both resolve the cache dtype from the model they load, so they
 * agree (a node that chose another dtype would have its KV refused: the descriptor carries the
 * dtype and the transfer checks it, transfer/kv_xfer.c), and the answer is the model-dtype
 * cache's answer of `speedctl generate --kv-dtype f32` (f16): same tokens, logprobs within 1e-4,
 * usage.kv_bytes at the dtype's size. `speedctl generate --kv-dtype bf16` is the control: its
 * logprobs are further from the cluster's than the reference's are (printed). */
#include <math.h>
#include <string.h>

#include "log.h"
#include "model.h"
#include "openai_util.h"

#define N_PROMPT 40
#define N_GEN    16
#define C        2

/* `speedctl generate --json` on model_dir with the cache dtype kv (NULL, printed, on failure). */
static json_t *gen_ref(const char *model_dir, const char *kv, const char *csv) {
    char out[1024];
    snprintf(out, sizeof out, "%s-ref-%s.json", model_dir, kv);
    if (tu_system("%s/speedctl generate --model %s --threads 1 --json --prompt-ids %s --prefill-layers %d "
                  "--kv-dtype %s --max-tokens %d --top-logprobs 2 > %s 2>%s.err",
                  cu_bin, model_dir, csv, C, kv, N_GEN, out, out) != 0) {
        fprintf(stderr, "speedctl generate failed, see %s.err\n", out);
        return NULL;
    }
    return json_load_file(out, 0, NULL);
}

/* One cluster on model_dir (kv.dtype left at its default) against the references. */
static void check_model(const char *model_dir, speed_dtype_t want) {
    speed_model_t *model = NULL;
    speed_tok_t *tok = NULL;
    CHECK_INT_EQ(speed_model_load(model_dir, NULL, &model), SPEED_OK);
    CHECK_INT_EQ(speed_tok_load(model_dir, NULL, &tok), SPEED_OK);
    if (!model || !tok) {
        speed_tok_destroy(tok);
        speed_model_destroy(model);
        return;
    }
    CHECK_INT_EQ(speed_model_kv_dtype(model), want);
    int32_t prompt[N_PROMPT];
    ou_prompt(prompt, N_PROMPT, model->config.vocab_size, 41);
    char *csv = ou_ids_csv(prompt, N_PROMPT);
    json_t *ref = gen_ref(model_dir, speed_dtype_name(want), csv), *bf16 = gen_ref(model_dir, "bf16", csv);
    CHECK(ref && bf16);

    const char *extra[] = {"--speed.prefill_layers", "2", "--log", "info", NULL}; /* kv.dtype: the default */
    cu_cluster_t c;
    cu_cluster_init(&c, 1, 1, extra);
    snprintf(c.model_dir, sizeof c.model_dir, "%s", model_dir);
    snprintf(c.common[1], sizeof c.common[1], "%s", model_dir); /* after "--model" */
    bool ok = cu_cluster_start_nodes(&c, 60);
    CHECK_MSG(ok, "nodes did not come up");
    bool ok_r = false;
    cu_proc_t r = ok ? cu_cluster_router(&c, 0, NULL, 30, &ok_r) : (cu_proc_t){0};
    CHECK_MSG(ok_r, "router did not come up");
    if (ok && ok_r && ref && bf16) {
        /* the served model id is the directory's name */
        char *body = ou_completion_body(strrchr(model_dir, '/') + 1, prompt, N_PROMPT, N_GEN, 2, false, NULL, NULL);
        cu_resp_t resp;
        CHECK(cu_http(cu_router_port(&c, 0), "POST", "/v1/completions", body, NULL, "auto-1", 60000, &resp));
        CHECK_INT_EQ(resp.status, 200);
        if (resp.json) {
            ou_result_t res;
            ou_from_json(&res, resp.json);
            ou_max_dev = 0.0;
            ou_check_ref(&res, ref, tok, false, speed_dtype_name(want));
            double dev_ref = ou_max_dev;
            CHECK_INT_EQ(ou_usage(&res, "kv_bytes"),
                         (long long)speed_kv_bytes_for_prompt(&model->config, C, 1, 1, N_PROMPT, want));
            CHECK_INT_EQ(ou_usage(&res, "kv_full_depth_bytes"),
                         (long long)speed_kv_bytes_for_prompt(&model->config, 4, 0, 0, N_PROMPT, want));
            /* the control: the bf16-cache answer, compared up to its first different token */
            json_t *toks = json_object_get(bf16, "tokens"), *tf = json_object_get(ref, "tokens");
            double dev_bf16 = 0.0;
            for (size_t i = 0; i < json_array_size(toks) && i < (size_t)res.n; i++) {
                json_t *a = json_array_get(toks, i), *b = json_array_get(tf, i);
                if (json_integer_value(json_object_get(a, "id")) != json_integer_value(json_object_get(b, "id"))) break;
                dev_bf16 = fmax(dev_bf16, fabs(json_number_value(json_object_get(a, "logprob")) - res.lp[i]));
            }
            printf("%s model, cluster (kv.dtype auto) vs generate: %s cache max |dlogprob| %.2e, bf16 cache %.2e\n",
                   speed_dtype_name(want), speed_dtype_name(want), dev_ref, dev_bf16);
            CHECK(dev_bf16 > dev_ref);
            ou_result_free(&res);
        }
        cu_resp_free(&resp);
        speed_free(body);
    }
    if (ok_r) CHECK_INT_EQ(cu_stop(&r, SIGTERM, 30), 0);
    if (ok) {
        CHECK_INT_EQ(cu_stop(&c.pre[0], SIGTERM, 30), 0);
        CHECK_INT_EQ(cu_stop(&c.dec[0], SIGTERM, 30), 0);
    }
    json_decref(ref);
    json_decref(bf16);
    speed_free(csv);
    speed_tok_destroy(tok);
    speed_model_destroy(model);
}

int main(void) {
    speed_log_configure("error");
    const char *shape = "--layers 4 --hidden 128 --heads 4 --kv_heads 2 --ffn 256";
    char opts[256], f32_dir[600], f16_dir[600];
    snprintf(opts, sizeof opts, "--dtype f32 %s", shape);
    cu_init_model("kv-auto-cluster", opts);
    snprintf(f32_dir, sizeof f32_dir, "%s/model", cu_dir);
    snprintf(f16_dir, sizeof f16_dir, "%s/model-f16", cu_dir);
    CHECK_MSG(
        tu_system("%s/speedctl make-tiny-model %s --dtype f16 %s > %s.log 2>&1", cu_bin, f16_dir, shape, f16_dir) == 0,
        "make-tiny-model --dtype f16 failed (%s.log)", f16_dir);
    check_model(f32_dir, SPEED_DTYPE_F32);
    check_model(f16_dir, SPEED_DTYPE_F16);
    int failed = CHECK_DONE();
    cu_cleanup(failed != 0);
    return failed;
}
