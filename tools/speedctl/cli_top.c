/* speedctl top: a live view of a running cluster in the terminal, refreshed from the metrics
 * endpoints (docs/speedctl.md#top). The scraping and the arithmetic are top_frame.c's, the
 * drawing top_render.c's; this file holds the verb: its options, the terminal (raw mode, size,
 * restored on every way out) and the refresh loop.
 *
 * The terminal: keys are read unbuffered without echo and without the terminal's own signals
 * (Ctrl-C arrives as a byte and quits like q), the screen is the alternate one, the cursor
 * hidden. SIGINT, SIGTERM, SIGHUP, SIGQUIT (sent by kill) and SIGPIPE end the loop through a self-pipe
 * (whatever thread they land on), so every exit goes through the one restore. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include "alloc.h"
#include "clock.h"
#include "speedctl.h"
#include "top.h"

typedef struct {
    char *router, *node;
    int64_t interval_ms, iterations, timeout_ms;
    bool once, json, color;
} top_opts_t;

static const speed_config_field_t top_fields[] = {
    {"router", SPEED_CONFIG_STRING, offsetof(top_opts_t, router), NULL, SPEED_CONFIG_UNBOUNDED, NULL,
     "the router's metrics endpoint HOST:PORT (instead of the cluster file's)"},
    {"node", SPEED_CONFIG_STRING, offsetof(top_opts_t, node), NULL, SPEED_CONFIG_UNBOUNDED, NULL,
     "the nodes' /metrics,/health endpoints HOST:PORT,... (instead of the cluster file's)"},
    {"interval", SPEED_CONFIG_INT, offsetof(top_opts_t, interval_ms), "1000", 50, 3600000, NULL,
     "milliseconds between refreshes (and the window rates and quantiles are taken over)"},
    {"iterations", SPEED_CONFIG_INT, offsetof(top_opts_t, iterations), "0", 0, 1000000000, NULL,
     "frames to show before exiting; 0 = until q, Ctrl-C or a signal"},
    {"timeout_ms", SPEED_CONFIG_INT, offsetof(top_opts_t, timeout_ms), "800", 10, 60000, NULL,
     "bound on each connection and read of an endpoint; one that takes longer is shown unreachable"},
    {"once", SPEED_CONFIG_BOOL, offsetof(top_opts_t, once), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "print one frame (two scrapes --interval apart, so rates are real) to stdout and exit: for scripts"},
    {"json", SPEED_CONFIG_BOOL, offsetof(top_opts_t, json), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "with --once: the frame as one JSON object"},
    {"color", SPEED_CONFIG_BOOL, offsetof(top_opts_t, color), "true", SPEED_CONFIG_UNBOUNDED, NULL,
     "colour the states on a terminal (--no-color: plain text)"},
};
#define N_TOP_FIELDS (sizeof top_fields / sizeof top_fields[0])

#define TOP_USAGE \
    "speedctl top [CLUSTER.yaml] [--router HOST:PORT] [--node HOST:PORT,...] [--interval MS] [--once [--json]]"

/* ---- the terminal --------------------------------------------------------------------------- */

static int g_wake[2] = {-1, -1}; /* self-pipe: signal handlers write here */
static volatile sig_atomic_t g_stop, g_resize;

static void on_stop(int sig) {
    int saved = errno;
    g_stop = sig;
    if (g_wake[1] >= 0 && write(g_wake[1], "s", 1) < 0) {}
    errno = saved;
}

static void on_winch(int sig) {
    (void)sig;
    int saved = errno;
    g_resize = 1;
    if (g_wake[1] >= 0 && write(g_wake[1], "w", 1) < 0) {}
    errno = saved;
}

typedef struct {
    bool raw;    /* stdin's settings changed (restore them) */
    bool screen; /* the alternate screen is on */
    struct termios saved;
    struct sigaction old[6];
} term_t;

/* SIGPIPE too: a closed stdout (top | head) must not kill top with the terminal in raw mode */
static const int stop_signals[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE};
#define N_STOP_SIGNALS (sizeof stop_signals / sizeof stop_signals[0])

static bool signals_install(term_t *t) {
    if (pipe(g_wake) != 0) return false;
    for (int k = 0; k < 2; k++) {
        fcntl(g_wake[k], F_SETFL, O_NONBLOCK);
        fcntl(g_wake[k], F_SETFD, FD_CLOEXEC);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = on_stop; /* no SA_RESTART: a wait returns at once */
    for (size_t k = 0; k < N_STOP_SIGNALS; k++) sigaction(stop_signals[k], &sa, &t->old[k]);
    sa.sa_handler = on_winch;
    sigaction(SIGWINCH, &sa, &t->old[N_STOP_SIGNALS]);
    return true;
}

static void signals_restore(term_t *t) {
    for (size_t k = 0; k < N_STOP_SIGNALS; k++) sigaction(stop_signals[k], &t->old[k], NULL);
    sigaction(SIGWINCH, &t->old[N_STOP_SIGNALS], NULL);
    for (int k = 0; k < 2; k++)
        if (g_wake[k] >= 0) close(g_wake[k]);
    g_wake[0] = g_wake[1] = -1;
}

static void term_enter(term_t *t) {
    if (isatty(STDIN_FILENO) && tcgetattr(STDIN_FILENO, &t->saved) == 0) {
        struct termios r = t->saved;
        r.c_lflag &= ~(tcflag_t)(ICANON | ECHO | ISIG | IEXTEN);
        r.c_iflag &= ~(tcflag_t)(IXON | ICRNL);
        r.c_cc[VMIN] = 0;
        r.c_cc[VTIME] = 0;
        t->raw = tcsetattr(STDIN_FILENO, TCSAFLUSH, &r) == 0;
    }
    fputs("\033[?1049h\033[?25l\033[2J\033[H", stdout); /* alternate screen, cursor hidden */
    fflush(stdout);
    t->screen = true;
}

static void term_leave(term_t *t) {
    if (t->screen) {
        fputs("\033[0m\033[?25h\033[?1049l", stdout);
        fflush(stdout);
        t->screen = false;
    }
    if (t->raw) {
        tcsetattr(STDIN_FILENO, TCSAFLUSH, &t->saved);
        t->raw = false;
    }
}

static void term_size(int *cols, int *rows) {
    struct winsize ws;
    if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) {
        *cols = ws.ws_col;
        *rows = ws.ws_row;
    } else {
        *cols = 80;
        *rows = 24;
    }
}

/* Waits until deadline (monotonic ms) for a key or a signal. True when the view should end. */
static bool wait_keys(int64_t deadline_ms, bool keys) {
    for (;;) {
        if (g_stop) return true;
        int64_t left = deadline_ms - speed_clock_mono_ms();
        if (left <= 0 || g_resize) return false;
        struct pollfd p[2] = {{.fd = g_wake[0], .events = POLLIN}, {.fd = STDIN_FILENO, .events = POLLIN}};
        int n = poll(p, keys ? 2 : 1, (int)left);
        if (n < 0 && errno != EINTR) return true;
        if (n <= 0) continue;
        char buf[64];
        if (p[0].revents)
            while (read(g_wake[0], buf, sizeof buf) > 0) {}
        if (keys && p[1].revents) {
            ssize_t k = read(STDIN_FILENO, buf, sizeof buf);
            if (k == 0) return true; /* the terminal is gone */
            for (ssize_t i = 0; i < k; i++)
                if (buf[i] == 'q' || buf[i] == 'Q' || buf[i] == 3 /* Ctrl-C */ || buf[i] == 4 /* Ctrl-D */) return true;
        }
    }
}

/* ---- frames --------------------------------------------------------------------------------- */

static void frame_draw(const speedctl_top_view_t *v, bool color) {
    speedctl_top_frame_t *fr = speed_malloc(sizeof *fr);
    if (!fr) return;
    speedctl_top_frame(v, fr);
    int cols, rows;
    term_size(&cols, &rows);
    char *text = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&text, &len);
    if (m) {
        fputs(g_resize ? "\033[2J\033[H" : "\033[H", m);
        speedctl_top_render_text(fr, cols, rows, color, true, m);
        fputs("\033[J", m); /* below the frame: nothing */
        if (fclose(m) == 0 && text) {
            fwrite(text, 1, len, stdout);
            fflush(stdout);
        }
        free(text); /* open_memstream's buffer is libc's */
    }
    g_resize = 0;
    speed_free(fr);
}

static int top_once(speedctl_top_view_t *v, const top_opts_t *o) {
    if (speedctl_top_scrape(v) != SPEED_OK) return SPEEDCTL_EXIT_FAIL;
    speed_clock_sleep_ms(o->interval_ms);
    if (speedctl_top_scrape(v) != SPEED_OK) return SPEEDCTL_EXIT_FAIL;
    speedctl_top_frame_t *fr = speed_malloc(sizeof *fr);
    if (!fr) return SPEEDCTL_EXIT_FAIL;
    speedctl_top_frame(v, fr);
    int rc = SPEEDCTL_EXIT_OK;
    if (o->json) {
        json_t *j = speedctl_top_render_json(fr);
        char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
        if (s) {
            printf("%s\n", s);
            free(s);
        } else {
            speedctl_fail("out of memory");
            rc = SPEEDCTL_EXIT_FAIL;
        }
        json_decref(j);
    } else {
        int cols = 0, rows = 0;
        if (isatty(STDOUT_FILENO)) term_size(&cols, &rows);
        speedctl_top_render_text(fr, cols, 0, false, false, stdout);
    }
    fflush(stdout);
    speed_free(fr);
    return rc;
}

static int top_live(speedctl_top_view_t *v, const top_opts_t *o) {
    term_t t;
    memset(&t, 0, sizeof t);
    g_stop = 0;
    g_resize = 1;
    if (!signals_install(&t)) {
        speedctl_fail("pipe: %s", strerror(errno));
        return SPEEDCTL_EXIT_FAIL;
    }
    /* nothing may print over the frame: errors are shown in it */
    speed_log_set_sink(speedctl_silent_sink, NULL);
    term_enter(&t);
    bool color = o->color && isatty(STDOUT_FILENO) && getenv("TERM") && strcmp(getenv("TERM"), "dumb") != 0 &&
                 !getenv("NO_COLOR");
    int rc = SPEEDCTL_EXIT_OK;
    for (int64_t frame = 0; !g_stop; frame++) {
        int64_t next = speed_clock_mono_ms() + o->interval_ms;
        if (speedctl_top_scrape(v) != SPEED_OK) {
            rc = SPEEDCTL_EXIT_FAIL;
            break;
        }
        if (g_stop) break;
        frame_draw(v, color);
        if (o->iterations && frame + 1 >= o->iterations) break;
        if (wait_keys(next, t.raw)) break;
        while (g_resize && !g_stop) { /* redraw at the new size now, then wait out the interval */
            frame_draw(v, color);
            if (wait_keys(next, t.raw)) goto out;
        }
    }
out:
    term_leave(&t);
    signals_restore(&t);
    speedctl_log_to_stderr();
    return rc;
}

static void top_help_print(void) {
    printf("usage: %s\n\n"
           "A live view of a running cluster: the router's /metrics and every node's /metrics and\n"
           "/health, scraped each --interval. The endpoints come from the cluster file (the same one\n"
           "speedctl up takes; any cluster option such as --router.port overrides it) or from\n"
           "--router/--node. q, Ctrl-C or a signal quits. See docs/speedctl.md#top.\n\n"
           "speedctl top's own options (command line or SPEED_TOP_<OPTION>):\n",
           TOP_USAGE);
    fflush(stdout);
    speed_config_print_help(top_fields, N_TOP_FIELDS, "SPEED_TOP_", stdout);
}

/* ---- the verb ------------------------------------------------------------------------------- */

int speedctl_top(int argc, char **argv) {
    top_opts_t o;
    memset(&o, 0, sizeof o);
    speedctl_up_args_t a;
    speed_config_t *tcfg = NULL, *ccfg = NULL;
    speedctl_top_view_t v;
    memset(&v, 0, sizeof v);
    int rc = SPEEDCTL_EXIT_USAGE;
    if (!speedctl_up_args_split(top_fields, N_TOP_FIELDS, argc, argv, &a)) {
        speedctl_fail("out of memory");
        rc = SPEEDCTL_EXIT_FAIL;
        goto out;
    }
    if (speed_config_load(top_fields, N_TOP_FIELDS, &o, a.up_argc, a.up_argv, "SPEED_TOP_", &tcfg) != SPEED_OK)
        goto usage;
    if (a.unknown) {
        speedctl_fail("unknown option '%s'", a.unknown);
        goto usage;
    }
    if (a.n_positional > 1) {
        speedctl_fail("top takes one cluster file (got %d arguments that are not options)", a.n_positional);
        goto usage;
    }
    if (a.config && a.config_option) {
        speedctl_fail("give the cluster file either as CLUSTER.yaml or with --config, not both");
        goto usage;
    }
    char **cargv = a.cluster_argv;
    int cargc = a.cluster_argc;
    if (a.config) {
        cargv[cargc++] = "--config";
        cargv[cargc++] = (char *)a.config;
        cargv[cargc] = NULL;
    }
    speed_cluster_config_t c;
    if (speed_cluster_config_load(cargc, cargv, NULL, &c, &ccfg) != SPEED_OK) goto usage;
    if (speed_config_help_requested(ccfg)) {
        top_help_print();
        rc = SPEEDCTL_EXIT_OK;
        goto out;
    }
    if (speed_config_print_requested(ccfg)) { /* the cluster the endpoints come from */
        rc = speed_config_print(ccfg, stdout) == SPEED_OK ? SPEEDCTL_EXIT_OK : SPEEDCTL_EXIT_FAIL;
        goto out;
    }
    if (o.json && !o.once) {
        speedctl_fail("--json prints one frame: use it with --once");
        goto usage;
    }
    bool listed = (o.router && *o.router) || (o.node && *o.node);
    speed_status_t st;
    if (listed)
        st = speedctl_top_view_from_list(o.router, o.node, &v);
    else if (speed_config_file(ccfg))
        st = speedctl_top_view_from_cluster(&c, speed_config_file(ccfg), &v);
    else {
        speedctl_fail("no cluster: speedctl top CLUSTER.yaml, or --router HOST:PORT and/or --node HOST:PORT,...");
        goto usage;
    }
    if (st == SPEED_ERR_INVALID_ARGUMENT) goto usage;
    if (st != SPEED_OK) {
        speedctl_fail("out of memory");
        rc = SPEEDCTL_EXIT_FAIL;
        goto out;
    }
    v.timeout_ms = (int)o.timeout_ms;
    if (o.once)
        rc = top_once(&v, &o);
    else
        rc = top_live(&v, &o);
    goto out;
usage:
    fprintf(stderr, "usage: %s\n", TOP_USAGE);
    rc = SPEEDCTL_EXIT_USAGE;
out:
    speedctl_top_view_cleanup(&v);
    speed_config_destroy(ccfg);
    speed_config_destroy(tcfg);
    speedctl_up_args_cleanup(&a);
    return rc;
}
