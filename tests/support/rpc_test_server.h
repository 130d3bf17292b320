/* A test server for tests/rpc: methods that exercise every way a call can be completed.
 * In library speed_test_rpc.
 *
 *   /t.Echo/Unary    unary: replies with the request, inside the handler
 *   /t.Echo/Later    unary: replies with the request from another thread, after the handler
 *                    returned
 *   /t.Echo/Fail     unary: fails with the speed_status_t in the request's first byte (negated)
 *   /t.Echo/Hang     unary: never replies; the cancel callback fails the call (from inside
 *                    the callback) and frees the handler's context
 *   /t.Echo/Count    stream: request = decimal N; a thread sends "0".."N-1" then finishes OK
 *   /t.Echo/Endless  stream: a thread sends messages every millisecond until cancelled,
 *                    then finishes and frees its context
 *   /t.Echo/Idle     stream: sends one message from the handler, then nothing; only the
 *                    cancel callback ends it (it finishes the call and frees the context)
 */
#ifndef SPEED_TESTS_RPC_TEST_SERVER_H
#define SPEED_TESTS_RPC_TEST_SERVER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
/* Not needed by the declarations: kept because the tests were written against a header that
 * brought them in. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "alloc.h"
#include "rpc.h"
#include "test_clock.h"

#define T_UNARY   "/t.Echo/Unary"
#define T_LATER   "/t.Echo/Later"
#define T_FAIL    "/t.Echo/Fail"
#define T_HANG    "/t.Echo/Hang"
#define T_COUNT   "/t.Echo/Count"
#define T_ENDLESS "/t.Echo/Endless"
#define T_IDLE    "/t.Echo/Idle"

/* The counters are written by the server's threads and read by the test: atomics. */
typedef struct {
    speed_rpc_server_t *server;
    int port;
    char target[64];
    atomic_int live_contexts;    /* handler contexts not yet freed */
    atomic_int cancel_fired;     /* cancel callbacks that ran */
    atomic_int streams_ended;    /* stream threads that finished */
    atomic_int finish_cancelled; /* terminal calls that returned SPEED_ERR_CANCELLED */
    pthread_mutex_t lock;
    pthread_t threads[4096];
    int n_threads;
} tserver_t;

/* Starts a server on 127.0.0.1:0 with every method above (port and "127.0.0.1:port" target in
 * ts); max_message_bytes 0 = the default. Returns SPEED_OK or the speed_rpc_server_* error. */
speed_status_t tserver_start(tserver_t *ts, size_t max_message_bytes);

/* Destroys the server (pending calls are cancelled), then joins every thread its handlers
 * started. */
void tserver_stop(tserver_t *ts);

#endif /* SPEED_TESTS_RPC_TEST_SERVER_H */
