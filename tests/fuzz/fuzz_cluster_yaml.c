/* Fuzzes the cluster YAML (common/config_file.c: the libyaml pre-pass and the libcyaml load
 * built from the cluster field table, then the value parsers and bounds of common/config.c
 * and the whole-cluster checks of daemons/cluster/cluster_config.c) through the real entry
 * point, speed_cluster_config_load with --config naming an in-memory file. A config that
 * loads is then printed (--print-config's text), and that text must load to the same values
 * (config.h's promise: printed again, it is the same but for the origin comments); its depth
 * is resolved and its addresses formatted, as a daemon does.
 *
 * Input: byte 0 picks the role checked (router, prefill, decode); the rest is the file. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cluster_config.h"
#include "config.h"
#include "fuzz_util.h"

extern char **environ;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_init();
    /* the environment is a config source too: keep the host's out of it */
    for (char **e = environ; *e;) {
        if (strncmp(*e, "SPEED_", 6) == 0 && strncmp(*e, "SPEED_FUZZ", 10) != 0) {
            char name[256];
            snprintf(name, sizeof name, "%.*s", (int)strcspn(*e, "="), *e);
            unsetenv(name);
        } else {
            e++;
        }
    }
    return 0;
}

/* --print-config's text with each line's origin comment (from its last '#') cut off. */
static char *print_values(const speed_config_t *cfg, size_t *len_p) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    FZ_ASSERT(f);
    FZ_ASSERT(speed_config_print(cfg, f) == SPEED_OK);
    fclose(f);
    size_t out = 0;
    for (size_t i = 0; i < len;) {
        size_t end = i;
        while (end < len && text[end] != '\n') end++;
        size_t cut = end;
        for (size_t k = i; k < end; k++)
            if (text[k] == '#') cut = k;
        memmove(text + out, text + i, cut - i);
        out += cut - i;
        text[out++] = '\n';
        i = end + 1;
    }
    *len_p = out;
    return text;
}

/* --print-config promises YAML that loads to the same values: load it and print it again. */
static void check_print_round_trip(const speed_config_t *cfg, const char *role) {
    size_t a_len = 0, b_len = 0;
    char *a = print_values(cfg, &a_len);
    char *full = NULL;
    size_t full_len = 0;
    FILE *f = open_memstream(&full, &full_len);
    FZ_ASSERT(f && speed_config_print(cfg, f) == SPEED_OK);
    fclose(f);
    char path[64];
    int fd = fz_memfd((const uint8_t *)full, full_len, path, sizeof path);
    char *argv[] = {"speed-fuzz", "--config", path, NULL};
    speed_cluster_config_t c2;
    speed_config_t *cfg2 = NULL;
    speed_status_t st = speed_cluster_config_load(3, argv, role, &c2, &cfg2);
    close(fd);
    if (st != SPEED_OK) fprintf(stderr, "--print-config output did not load again:\n%s\n", full);
    FZ_ASSERT(st == SPEED_OK);
    char *b = print_values(cfg2, &b_len);
    if (a_len != b_len || memcmp(a, b, a_len) != 0) fprintf(stderr, "first:\n%.*s\nagain:\n%.*s\n", (int)a_len, a, (int)b_len, b);
    FZ_ASSERT(a_len == b_len && memcmp(a, b, a_len) == 0);
    speed_config_destroy(cfg2);
    free(a);
    free(b);
    free(full);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    static const char *const roles[] = {"router", "prefill", "decode", NULL};
    const char *role = roles[data[0] % 4];
    char path[64];
    int fd = fz_memfd(data + 1, size - 1, path, sizeof path);
    char *argv[] = {"speed-fuzz", "--config", path, NULL};
    speed_cluster_config_t c;
    speed_config_t *cfg = NULL;
    speed_status_t st = speed_cluster_config_load(3, argv, role, &c, &cfg);
    close(fd);
    if (st != SPEED_OK) {
        FZ_ASSERT(!cfg);
        FZ_ASSERT(st == SPEED_ERR_INVALID_ARGUMENT || st == SPEED_ERR_PARSE || st == SPEED_ERR_NO_MEMORY ||
                  st == SPEED_ERR_IO);
        return 0;
    }
    FZ_ASSERT(cfg);
    check_print_round_trip(cfg, role);
    speed_depth_t depth;
    char err[256];
    if (speed_cluster_config_depth(&c, 32, &depth, err, sizeof err) == SPEED_OK)
        FZ_ASSERT(depth.prefill_layers >= 1 && depth.prefill_layers <= 32 && depth.anchors >= 0 && depth.tail >= 1);
    const speed_pool_config_t *pool = speed_cluster_pool(&c, role);
    if (pool) {
        char addr[512];
        speed_cluster_grpc_addr(&c, pool, 0, addr, sizeof addr);
        speed_cluster_http_addr(&c, pool, 0, addr, sizeof addr);
    }
    speed_config_destroy(cfg);
    return 0;
}
