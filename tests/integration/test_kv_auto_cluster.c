/* kv.dtype auto (the default) through a real 1P1D cluster on an f32 model: the prefill and the
 * decode node both resolve the cache dtype from the model they load, so they agree (a node
 * that chose another dtype would have its KV refused: the descriptor carries the dtype and the
 * transfer checks it, transfer/kv_xfer.c), and the answer is the f32-cache answer of
 * `speedctl generate --kv-dtype f32`: same tokens, logprobs within 1e-4, usage.kv_bytes at 4
 * bytes an element. `speedctl generate --kv-dtype bf16` is the control: its logprobs are
 * further from the cluster's than the f32 reference's are (printed). */
#include <math.h>

#include "log.h"
#include "model.h"
#include "openai_util.h"

#define N_PROMPT 40
#define N_GEN    16
#define C        2

int main(void) {
    speed_log_configure("error");
    cu_init_model("kv-auto-cluster", "--dtype f32 --layers 4 --hidden 128 --heads 4 --kv_heads 2 --ffn 256");
    char model_dir[600];
    snprintf(model_dir, sizeof model_dir, "%s/model", cu_dir);
    speed_model_t *model = NULL;
    speed_tok_t *tok = NULL;
    CHECK_INT_EQ(speed_model_load(model_dir, NULL, &model), SPEED_OK);
    CHECK_INT_EQ(speed_tok_load(model_dir, NULL, &tok), SPEED_OK);
    if (!model || !tok) return CHECK_DONE();
    CHECK_INT_EQ(speed_model_kv_dtype(model), SPEED_DTYPE_F32);
    int32_t prompt[N_PROMPT];
    ou_prompt(prompt, N_PROMPT, model->config.vocab_size, 41);
    char *csv = ou_ids_csv(prompt, N_PROMPT);
    json_t *ref = ou_ref("f32", "--prompt-ids %s --prefill-layers %d --kv-dtype f32 --max-tokens %d --top-logprobs 2",
                         csv, C, N_GEN);
    json_t *bf16 = ou_ref(
        "bf16", "--prompt-ids %s --prefill-layers %d --kv-dtype bf16 --max-tokens %d --top-logprobs 2", csv, C, N_GEN);
    CHECK(ref && bf16);

    const char *extra[] = {"--speed.prefill_layers", "2", "--log", "info", NULL}; /* kv.dtype: the default */
    cu_cluster_t c;
    cu_cluster_init(&c, 1, 1, extra);
    bool ok = cu_cluster_start_nodes(&c, 60);
    CHECK_MSG(ok, "nodes did not come up");
    bool ok_r = false;
    cu_proc_t r = ok ? cu_cluster_router(&c, 0, NULL, 30, &ok_r) : (cu_proc_t){0};
    CHECK_MSG(ok_r, "router did not come up");
    if (ok && ok_r && ref && bf16) {
        char *body = ou_completion_body("model", prompt, N_PROMPT, N_GEN, 2, false, NULL, NULL);
        cu_resp_t resp;
        CHECK(cu_http(cu_router_port(&c, 0), "POST", "/v1/completions", body, NULL, "auto-1", 60000, &resp));
        CHECK_INT_EQ(resp.status, 200);
        if (resp.json) {
            ou_result_t res;
            ou_from_json(&res, resp.json);
            ou_check_ref(&res, ref, tok, false, "auto vs f32 cache");
            double dev_f32 = ou_max_dev;
            CHECK_INT_EQ(ou_usage(&res, "kv_bytes"),
                         (long long)speed_kv_bytes_for_prompt(&model->config, C, 1, 1, N_PROMPT, SPEED_DTYPE_F32));
            /* the control: the bf16-cache answer, compared up to its first different token */
            json_t *toks = json_object_get(bf16, "tokens"), *tf = json_object_get(ref, "tokens");
            double dev_bf16 = 0.0;
            for (size_t i = 0; i < json_array_size(toks) && i < (size_t)res.n; i++) {
                json_t *a = json_array_get(toks, i), *b = json_array_get(tf, i);
                if (json_integer_value(json_object_get(a, "id")) != json_integer_value(json_object_get(b, "id"))) break;
                dev_bf16 = fmax(dev_bf16, fabs(json_number_value(json_object_get(a, "logprob")) - res.lp[i]));
            }
            printf("cluster (kv.dtype auto) vs generate: f32 cache max |dlogprob| %.2e, bf16 cache %.2e\n", dev_f32,
                   dev_bf16);
            CHECK(dev_bf16 > dev_f32);
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
    int failed = CHECK_DONE();
    cu_cleanup(failed != 0);
    return failed;
}
