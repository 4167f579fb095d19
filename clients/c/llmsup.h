/* llmsup.h: a small C client for the llmsup wire protocol v1 (protocol/SPEC.md).
 *
 * One llmsup_client is one ZeroMQ DEALER connection. Requests are 4 frames (version,
 * verb, request id, JSON body); replies are 4 frames (version, kind, request id, body).
 * JSON is handled with jansson. Not thread-safe: use one client per thread.
 *
 *     llmsup_client *c = llmsup_connect("ipc:///tmp/llmsup-0/client.sock", 0);
 *     json_t *body = json_pack("{s:s, s:i}", "prompt", "Once upon a time", "max_tokens", 32);
 *     llmsup_stream_opts opts = {.on_token = print_token};
 *     llmsup_error err;
 *     json_t *done = NULL;
 *     int rc = llmsup_request(c, "complete", body, &opts, &done, &err);
 *     ...
 *     json_decref(done); json_decref(body); llmsup_close(c);
 *
 * The body is the request's as SPEC.md 3 gives it, so every field is the caller's to set:
 * `complete`, `chat` and `tokenize` name a model the server serves with a "model" member
 * (`json_object_set_new(body, "model", json_string("smollm2-135m-instruct"))`; absent or
 * null: the server's default; an unknown name: `bad_request` with field "model"). While
 * the model loads, the request's `queued` frames carry "loading" (opts->on_event).
 *
 * Structured output, sampling knobs and tools (SPEC.md 3.1, 3.11, 3.12) are body members
 * too: "min_p", "presence_penalty", "frequency_penalty", "repeat_penalty", "repeat_last_n",
 * "logit_bias" ({"<token id>": bias}), "grammar" (GBNF text), "json_schema" (an object),
 * and for `chat` "tools", "tool_choice", "parallel_tool_calls", messages of role "tool"
 * (with "tool_call_id") and assistant messages with "tool_calls". llmsup_set_json_file,
 * llmsup_set_text_file and llmsup_add_logit_bias below fill them from files and numbers.
 * A chat the model answered with calls ends with finish_reason "tool_calls" and the calls
 * in DONE: llmsup_finish_reason and llmsup_tool_calls read them.
 *
 * Liveness (SPEC.md 4.1): the server sends a frame of every live request at least every
 * 2 s (`accepted` at once, then `queued`/`running` heartbeats and tokens), so the receive
 * timeout is per frame, LLMSUP_RECEIVE_TIMEOUT_MS by default. LLMSUP_TIMEOUT means the
 * request, or the server, may be lost: ping, and compare the pong's "instance" with
 * llmsup_instance() from before; another instance restarted and lost the request.
 */
#ifndef LLMSUP_H
#define LLMSUP_H

#include <jansson.h>
#include <signal.h>
#include <stddef.h>

#define LLMSUP_PROTOCOL "LLMSUP1"
#define LLMSUP_MAX_ID_BYTES 64
/* How long to wait for the next frame of a request before taking it for lost (SPEC 4.1). */
#define LLMSUP_RECEIVE_TIMEOUT_MS 5000
/* An instance id: 16 hex digits (a server may send up to this many characters). */
#define LLMSUP_MAX_INSTANCE 32

/* Results of llmsup_request and friends. */
enum {
    LLMSUP_OK = 0,          /* `done` arrived */
    LLMSUP_ERROR_REPLY = 1, /* the server answered `error`: see the llmsup_error */
    LLMSUP_TIMEOUT = 2,     /* no frame for the request within the receive timeout: it, or
                               the server, may be lost; ping (SPEC 4.1) */
    LLMSUP_IO = 3           /* a local failure (ZeroMQ, encoding): see llmsup_last_error */
};

typedef struct llmsup_client llmsup_client;

/* An `error` reply (SPEC.md section 5). Absent members are "" or -1. */
typedef struct {
    char code[32];
    char message[512];
    char field[64];
    long retry_after_ms;
    long tokens_sent;
} llmsup_error;

/* Called for each `token` frame; text is UTF-8, not NUL-terminated inside. Return 0. */
typedef int (*llmsup_token_fn)(const char *text, size_t len, void *user);

/* Called instead of llmsup_token_fn when set: the same frame with the completion it belongs
 * to, `index` (0 to n - 1 for a request with "n" above 1, SPEC.md 3.16; else 0). */
typedef int (*llmsup_choice_token_fn)(int index, const char *text, size_t len, void *user);

/* Called for each other non-terminal frame of the request: `accepted`, `queued`, `running`
 * or a kind added later (SPEC 4), with its body (borrowed: do not decref). Return 0. */
typedef int (*llmsup_event_fn)(const char *kind, const json_t *body, void *user);

typedef struct {
    llmsup_token_fn on_token; /* may be NULL */
    void *user;
    /* When *cancel becomes nonzero (e.g. from a SIGINT handler) the request is cancelled:
     * the `cancel` verb is sent once and llmsup_request returns at the request's terminal
     * frame, normally the error `cancelled`. May be NULL. */
    volatile sig_atomic_t *cancel;
    /* Longest wait for the next frame of the request, in ms; 0: the client's default. */
    int timeout_ms;
    llmsup_event_fn on_event; /* may be NULL; gets opts->user too */
    /* may be NULL; when set, token frames go here (with their index), not to on_token */
    llmsup_choice_token_fn on_choice_token;
} llmsup_stream_opts;

/* Connect a DEALER to endpoint (ipc://... or tcp://...). timeout_ms is the default
 * receive timeout per frame; 0 or less: LLMSUP_RECEIVE_TIMEOUT_MS. Returns NULL on
 * failure (errno set). */
llmsup_client *llmsup_connect(const char *endpoint, int timeout_ms);
void llmsup_close(llmsup_client *client);

/* CURVE keys (Z85 text, NUL-terminated) for a tcp endpoint: a supervisor bound to tcp
 * authenticates its peers with CURVE unless started with --tcp-auth none (docs/security.md). The state dir holds them: curve-server.pub, curve-client.pub and
 * curve-client.key (0600, its user's only). */
typedef struct {
    char server_key[41];
    char public_key[41];
    char secret_key[41];
} llmsup_curve_keys;

/* Like llmsup_connect, as a CURVE client with these keys (NULL: none). Fails with errno
 * ENOTSUP when libzmq has no CURVE (zmq_has("curve"): built without libsodium). */
llmsup_client *llmsup_connect_curve(const char *endpoint, int timeout_ms,
                                    const llmsup_curve_keys *keys);

/* Read the client keys from a state dir (NULL: the default one, as llmsup_find_endpoint).
 * Returns 0; 1 if it has none or its server says --tcp-auth none (connect without);
 * -1 with a reason in why. */
int llmsup_read_curve_keys(const char *state_dir, llmsup_curve_keys *keys, char *why,
                           size_t whylen);

/* The server instance this client saw last, from an `accepted` frame or the `done` of a
 * ping or status; "" before any. It changes when the server restarts (SPEC 4.1). */
const char *llmsup_instance(const llmsup_client *client);

/* The endpoint of the running supervisor, read from STATE_DIR/supervisor.json. state_dir
 * NULL: $LLMSUP_STATE_DIR, else $XDG_RUNTIME_DIR/llmsup, else /tmp/llmsup-UID (SPEC 1).
 * Returns 0, or -1 with a reason in why. */
int llmsup_find_endpoint(const char *state_dir, char *out, size_t outlen, char *why,
                         size_t whylen);

/* Send one request and wait for its terminal frame, passing streamed text to
 * opts->on_token. On LLMSUP_OK *done (if done is not NULL) holds the `done` body (the
 * caller json_decref's it); on LLMSUP_ERROR_REPLY *err is filled. body may be NULL ({}).
 * Replies to other request ids (earlier, abandoned ones) are skipped. */
int llmsup_request(llmsup_client *client, const char *verb, const json_t *body,
                   const llmsup_stream_opts *opts, json_t **done, llmsup_error *err);

/* Lower level: send 4 frames as given / receive one reply. llmsup_recv returns LLMSUP_OK
 * with kind, id (NUL-terminated) and *body (caller decrefs), or LLMSUP_TIMEOUT/LLMSUP_IO. */
int llmsup_send(llmsup_client *client, const char *verb, const char *request_id,
                const json_t *body);
int llmsup_recv(llmsup_client *client, char kind[32], char id[LLMSUP_MAX_ID_BYTES + 1],
                json_t **body, int timeout_ms);

/* A new request id for this client: "c<pid>-<n>". */
void llmsup_new_id(llmsup_client *client, char id[LLMSUP_MAX_ID_BYTES + 1]);

/* --- Request fields from files, and what DONE says (SPEC.md 3.1, 3.4, 3.11, 3.12) --- */

/* body[key] = the JSON value in the file at path (a "json_schema", "tools", ...). Returns
 * 0, or -1 with a reason in why (the file cannot be read, or is not JSON). */
int llmsup_set_json_file(json_t *body, const char *key, const char *path, char *why,
                         size_t whylen);

/* body[key] = the text of the file at path as a string (a GBNF "grammar"). Returns 0, or
 * -1 with a reason in why (cannot be read, not UTF-8, holds a NUL). */
int llmsup_set_text_file(json_t *body, const char *key, const char *path, char *why,
                         size_t whylen);

/* Add token -> bias to body's "logit_bias" object (made if absent): the server adds bias
 * (-100 to 100) to that token's logit. Returns 0, or -1 if body's "logit_bias" is not an
 * object or memory ran out. */
int llmsup_add_logit_bias(json_t *body, unsigned long token, double bias);

/* A tool call of a DONE body. The strings belong to the body: valid while it lives. */
typedef struct {
    const char *id;        /* "call_..." */
    const char *name;      /* the function called */
    const char *arguments; /* JSON text, valid against the tool's parameters */
} llmsup_tool_call;

/* DONE's finish_reason: "stop", "length" or "tool_calls"; "" if it has none (tokenize). */
const char *llmsup_finish_reason(const json_t *done);

/* The tool calls of a DONE (a chat with tools answered with calls): stores up to max of
 * them in calls (which may be NULL when max is 0) and returns how many DONE holds; 0 when
 * it has none. Members of a call that are missing or not strings are "". */
size_t llmsup_tool_calls(const json_t *done, llmsup_tool_call *calls, size_t max);

/* The last local failure, for LLMSUP_IO and LLMSUP_TIMEOUT. */
const char *llmsup_last_error(const llmsup_client *client);

#endif
