/* llmsup.c: see llmsup.h. */
#define _POSIX_C_SOURCE 200809L

#include "llmsup.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

struct llmsup_client {
    void *ctx;
    void *sock;
    int timeout_ms;
    unsigned long next_id;
    char instance[LLMSUP_MAX_INSTANCE + 1];
    char last_error[512];
};

static void set_error(llmsup_client *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->last_error, sizeof c->last_error, fmt, ap);
    va_end(ap);
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

llmsup_client *llmsup_connect(const char *endpoint, int timeout_ms) {
    return llmsup_connect_curve(endpoint, timeout_ms, NULL);
}

llmsup_client *llmsup_connect_curve(const char *endpoint, int timeout_ms,
                                    const llmsup_curve_keys *keys) {
    if (keys && !zmq_has("curve")) {
        errno = ENOTSUP; /* this libzmq was built without libsodium/tweetnacl */
        return NULL;
    }
    llmsup_client *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : LLMSUP_RECEIVE_TIMEOUT_MS;
    c->next_id = 1;
    c->ctx = zmq_ctx_new();
    if (!c->ctx) goto fail;
    c->sock = zmq_socket(c->ctx, ZMQ_DEALER);
    if (!c->sock) goto fail;
    int linger = 0; /* closing never blocks on unsent requests (SPEC 1) */
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    if (keys) { /* Z85 text, 40 characters and a NUL (docs/security.md) */
        if (zmq_setsockopt(c->sock, ZMQ_CURVE_SERVERKEY, keys->server_key, 41) != 0 ||
            zmq_setsockopt(c->sock, ZMQ_CURVE_PUBLICKEY, keys->public_key, 41) != 0 ||
            zmq_setsockopt(c->sock, ZMQ_CURVE_SECRETKEY, keys->secret_key, 41) != 0)
            goto fail;
    }
    if (zmq_connect(c->sock, endpoint) != 0) goto fail;
    return c;
fail:;
    int saved = errno;
    llmsup_close(c);
    errno = saved;
    return NULL;
}

void llmsup_close(llmsup_client *c) {
    if (!c) return;
    if (c->sock) zmq_close(c->sock);
    if (c->ctx) zmq_ctx_term(c->ctx);
    free(c);
}

const char *llmsup_last_error(const llmsup_client *c) { return c->last_error; }

const char *llmsup_instance(const llmsup_client *c) { return c->instance; }

/* Keep the "instance" member of a reply body, if it has one (accepted, ping, status). */
static void note_instance(llmsup_client *c, const json_t *body) {
    const json_t *instance = json_object_get(body, "instance");
    if (json_is_string(instance))
        snprintf(c->instance, sizeof c->instance, "%s", json_string_value(instance));
}

void llmsup_new_id(llmsup_client *c, char id[LLMSUP_MAX_ID_BYTES + 1]) {
    snprintf(id, LLMSUP_MAX_ID_BYTES + 1, "c%ld-%lu", (long)getpid(), c->next_id++);
}

static int send_frame(llmsup_client *c, const void *data, size_t len, int more) {
    if (zmq_send(c->sock, data, len, more ? ZMQ_SNDMORE : 0) < 0) {
        set_error(c, "send: %s", zmq_strerror(errno));
        return -1;
    }
    return 0;
}

int llmsup_send(llmsup_client *c, const char *verb, const char *request_id, const json_t *body) {
    size_t idlen = strlen(request_id);
    if (idlen == 0 || idlen > LLMSUP_MAX_ID_BYTES) {
        set_error(c, "request id must be 1 to %d bytes", LLMSUP_MAX_ID_BYTES);
        return LLMSUP_IO;
    }
    char *json = body ? json_dumps(body, JSON_COMPACT) : NULL;
    if (body && !json) {
        set_error(c, "could not encode the request body as JSON");
        return LLMSUP_IO;
    }
    const char *text = json ? json : "{}";
    int rc = LLMSUP_OK;
    if (send_frame(c, LLMSUP_PROTOCOL, strlen(LLMSUP_PROTOCOL), 1) ||
        send_frame(c, verb, strlen(verb), 1) || send_frame(c, request_id, idlen, 1) ||
        send_frame(c, text, strlen(text), 0))
        rc = LLMSUP_IO;
    free(json);
    return rc;
}

/* Receive one whole message into up to 4 frames; returns the frame count or -1. */
static int recv_message(llmsup_client *c, zmq_msg_t frames[4]) {
    int n = 0;
    for (;;) {
        zmq_msg_t part;
        zmq_msg_init(&part);
        if (zmq_msg_recv(&part, c->sock, 0) < 0) {
            set_error(c, "receive: %s", zmq_strerror(errno));
            zmq_msg_close(&part);
            for (int i = 0; i < n && i < 4; i++) zmq_msg_close(&frames[i]);
            return -1;
        }
        int more = zmq_msg_more(&part);
        if (n < 4) {
            frames[n] = part;
        } else {
            zmq_msg_close(&part);
        }
        n++;
        if (!more) break;
    }
    return n;
}

int llmsup_recv(llmsup_client *c, char kind[32], char id[LLMSUP_MAX_ID_BYTES + 1],
                json_t **body, int timeout_ms) {
    zmq_pollitem_t item = {.socket = c->sock, .events = ZMQ_POLLIN};
    int ready = zmq_poll(&item, 1, timeout_ms);
    if (ready < 0) {
        if (errno == EINTR) { /* a signal: let the caller look at its flags */
            set_error(c, "interrupted");
            return LLMSUP_TIMEOUT;
        }
        set_error(c, "poll: %s", zmq_strerror(errno));
        return LLMSUP_IO;
    }
    if (ready == 0) {
        set_error(c, "no reply in %d ms", timeout_ms);
        return LLMSUP_TIMEOUT;
    }
    zmq_msg_t frames[4];
    int n = recv_message(c, frames);
    if (n < 0) return LLMSUP_IO;
    int rc = LLMSUP_OK;
    if (n != 4 || zmq_msg_size(&frames[0]) != strlen(LLMSUP_PROTOCOL) ||
        memcmp(zmq_msg_data(&frames[0]), LLMSUP_PROTOCOL, strlen(LLMSUP_PROTOCOL)) != 0 ||
        zmq_msg_size(&frames[1]) >= 32 || zmq_msg_size(&frames[2]) > LLMSUP_MAX_ID_BYTES) {
        set_error(c, "malformed reply (%d frames)", n);
        rc = LLMSUP_IO;
    } else {
        memcpy(kind, zmq_msg_data(&frames[1]), zmq_msg_size(&frames[1]));
        kind[zmq_msg_size(&frames[1])] = '\0';
        memcpy(id, zmq_msg_data(&frames[2]), zmq_msg_size(&frames[2]));
        id[zmq_msg_size(&frames[2])] = '\0';
        json_error_t jerr;
        *body = json_loadb(zmq_msg_data(&frames[3]), zmq_msg_size(&frames[3]), JSON_ALLOW_NUL,
                           &jerr);
        if (!*body || !json_is_object(*body)) {
            set_error(c, "reply body is not a JSON object: %s", jerr.text);
            json_decref(*body);
            *body = NULL;
            rc = LLMSUP_IO;
        }
    }
    for (int i = 0; i < n && i < 4; i++) zmq_msg_close(&frames[i]);
    return rc;
}

static void copy_string(char *dst, size_t size, const json_t *value) {
    const char *s = json_is_string(value) ? json_string_value(value) : "";
    snprintf(dst, size, "%s", s);
}

static void fill_error(llmsup_error *err, const json_t *body) {
    copy_string(err->code, sizeof err->code, json_object_get(body, "code"));
    copy_string(err->message, sizeof err->message, json_object_get(body, "message"));
    copy_string(err->field, sizeof err->field, json_object_get(body, "field"));
    const json_t *retry = json_object_get(body, "retry_after_ms");
    err->retry_after_ms = json_is_integer(retry) ? (long)json_integer_value(retry) : -1;
    const json_t *sent = json_object_get(body, "tokens_sent");
    err->tokens_sent = json_is_integer(sent) ? (long)json_integer_value(sent) : -1;
}

int llmsup_request(llmsup_client *c, const char *verb, const json_t *body,
                   const llmsup_stream_opts *opts, json_t **done, llmsup_error *err) {
    static const llmsup_stream_opts no_opts;
    if (!opts) opts = &no_opts;
    if (done) *done = NULL;
    memset(err, 0, sizeof *err);
    err->retry_after_ms = err->tokens_sent = -1;

    char id[LLMSUP_MAX_ID_BYTES + 1];
    llmsup_new_id(c, id);
    int rc = llmsup_send(c, verb, id, body);
    if (rc != LLMSUP_OK) return rc;

    int timeout = opts->timeout_ms > 0 ? opts->timeout_ms : c->timeout_ms;
    long long deadline = now_ms() + timeout;
    int cancel_sent = 0;
    char accepted_by[LLMSUP_MAX_INSTANCE + 1] = ""; /* the instance that accepted it */
    for (;;) {
        if (opts->cancel && *opts->cancel && !cancel_sent) {
            char cancel_id[LLMSUP_MAX_ID_BYTES + 1];
            llmsup_new_id(c, cancel_id);
            json_t *target = json_pack("{s:s}", "target", id);
            rc = llmsup_send(c, "cancel", cancel_id, target);
            json_decref(target);
            if (rc != LLMSUP_OK) return rc;
            cancel_sent = 1;
            deadline = now_ms() + timeout; /* now wait for the target's terminal frame */
        }
        long long left = deadline - now_ms();
        if (left <= 0) {
            set_error(c,
                      "no frame for request %s from %s%s in %d ms: the request, or the server, "
                      "may be lost; ping the server (another instance restarted and lost the "
                      "request) and resend it only if it is safe to repeat",
                      id, accepted_by[0] ? "instance " : "the server", accepted_by, timeout);
            return LLMSUP_TIMEOUT;
        }
        /* Short slices while a cancel could still be asked for, so it is seen quickly. */
        int slice = (opts->cancel && !cancel_sent && left > 100) ? 100 : (int)left;
        char kind[32], rid[LLMSUP_MAX_ID_BYTES + 1];
        json_t *reply = NULL;
        rc = llmsup_recv(c, kind, rid, &reply, slice);
        if (rc == LLMSUP_TIMEOUT) continue; /* the deadline above decides */
        if (rc != LLMSUP_OK) return rc;
        if (strcmp(rid, id) != 0) { /* our cancel's own `done`, or an abandoned request */
            json_decref(reply);
            continue;
        }
        deadline = now_ms() + timeout; /* the timeout is per frame */
        if (strcmp(kind, "token") == 0) {
            const json_t *text = json_object_get(reply, "text");
            const json_t *index = json_object_get(reply, "index");
            if (opts->on_choice_token && json_is_string(text))
                opts->on_choice_token(json_is_integer(index) ? (int)json_integer_value(index) : 0,
                                      json_string_value(text), json_string_length(text),
                                      opts->user);
            else if (opts->on_token && json_is_string(text))
                opts->on_token(json_string_value(text), json_string_length(text), opts->user);
            json_decref(reply);
        } else if (strcmp(kind, "done") == 0) {
            note_instance(c, reply);
            if (done)
                *done = reply;
            else
                json_decref(reply);
            return LLMSUP_OK;
        } else if (strcmp(kind, "error") == 0) {
            fill_error(err, reply);
            json_decref(reply);
            return LLMSUP_ERROR_REPLY;
        } else { /* `accepted`, `queued`, `running`, or a kind added later: not terminal */
            if (strcmp(kind, "accepted") == 0) {
                note_instance(c, reply);
                snprintf(accepted_by, sizeof accepted_by, "%s", c->instance);
            }
            if (opts->on_event) opts->on_event(kind, reply, opts->user);
            json_decref(reply);
        }
    }
}

static void resolve_state_dir(const char *state_dir, char *dir, size_t size) {
    const char *env = getenv("LLMSUP_STATE_DIR");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    if (state_dir && *state_dir) {
        snprintf(dir, size, "%s", state_dir);
    } else if (env && *env) {
        snprintf(dir, size, "%s", env);
    } else if (xdg && *xdg && access(xdg, W_OK) == 0) {
        snprintf(dir, size, "%s/llmsup", xdg);
    } else {
        snprintf(dir, size, "/tmp/llmsup-%ld", (long)getuid());
    }
}

int llmsup_find_endpoint(const char *state_dir, char *out, size_t outlen, char *why,
                         size_t whylen) {
    char dir[4096];
    resolve_state_dir(state_dir, dir, sizeof dir);
    char path[4200];
    snprintf(path, sizeof path, "%s/supervisor.json", dir);
    json_error_t jerr;
    json_t *info = json_load_file(path, 0, &jerr);
    if (!info) {
        snprintf(why, whylen, "llmsup is not running (cannot read %s: %s)", path, jerr.text);
        return -1;
    }
    const json_t *endpoint = json_object_get(info, "endpoint");
    int rc = 0;
    if (!json_is_string(endpoint) || json_string_length(endpoint) >= outlen) {
        snprintf(why, whylen, "%s has no usable \"endpoint\"", path);
        rc = -1;
    } else {
        snprintf(out, outlen, "%s", json_string_value(endpoint));
    }
    json_decref(info);
    return rc;
}

/* One Z85 key from a file of the state dir: 40 characters, then optional whitespace. */
static int read_key(const char *dir, const char *name, char key[41], char *why, size_t whylen) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "re");
    if (!f) {
        snprintf(why, whylen, "cannot read %s: %s", path, strerror(errno));
        return errno == ENOENT ? 1 : -1;
    }
    char buf[64] = {0};
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' ' || buf[n - 1] == '\r')) n--;
    if (n != 40) {
        snprintf(why, whylen, "%s does not hold a Z85 CURVE key", path);
        return -1;
    }
    memcpy(key, buf, 40);
    key[40] = '\0';
    return 0;
}

int llmsup_read_curve_keys(const char *state_dir, llmsup_curve_keys *keys, char *why,
                           size_t whylen) {
    char dir[4096];
    resolve_state_dir(state_dir, dir, sizeof dir);
    char path[4200];
    snprintf(path, sizeof path, "%s/supervisor.json", dir);
    json_t *info = json_load_file(path, 0, NULL);
    if (info) { /* a server started with --tcp-auth none wants no CURVE */
        const json_t *auth = json_object_get(info, "tcp_auth");
        int none = json_is_string(auth) && strcmp(json_string_value(auth), "none") == 0;
        json_decref(info);
        if (none) {
            snprintf(why, whylen, "the server in %s does not authenticate tcp peers", dir);
            return 1;
        }
    }
    int rc = read_key(dir, "curve-server.pub", keys->server_key, why, whylen);
    if (rc == 0) rc = read_key(dir, "curve-client.pub", keys->public_key, why, whylen);
    if (rc == 0) rc = read_key(dir, "curve-client.key", keys->secret_key, why, whylen);
    return rc;
}

int llmsup_set_json_file(json_t *body, const char *key, const char *path, char *why,
                         size_t whylen) {
    json_error_t jerr;
    json_t *value = json_load_file(path, JSON_DECODE_ANY, &jerr);
    if (!value) {
        snprintf(why, whylen, "%s: %s", path, jerr.text);
        return -1;
    }
    if (json_object_set_new(body, key, value) != 0) {
        snprintf(why, whylen, "cannot set %s in the request body", key);
        return -1;
    }
    return 0;
}

int llmsup_set_text_file(json_t *body, const char *key, const char *path, char *why,
                         size_t whylen) {
    FILE *f = fopen(path, "re");
    if (!f) {
        snprintf(why, whylen, "%s: %s", path, strerror(errno));
        return -1;
    }
    size_t len = 0, cap = 4096;
    char *text = malloc(cap);
    int failed = text == NULL;
    while (!failed) {
        if (len == cap) {
            char *bigger = realloc(text, cap *= 2);
            if (!bigger) {
                failed = 1;
                break;
            }
            text = bigger;
        }
        size_t n = fread(text + len, 1, cap - len, f);
        len += n;
        if (n == 0) {
            failed = ferror(f);
            break;
        }
    }
    fclose(f);
    if (failed) {
        snprintf(why, whylen, "%s: cannot read it", path);
        free(text);
        return -1;
    }
    json_t *value = memchr(text, '\0', len) ? NULL : json_stringn(text, len);
    free(text);
    if (!value) {
        snprintf(why, whylen, "%s: not UTF-8 text, or it holds a NUL", path);
        return -1;
    }
    if (json_object_set_new(body, key, value) != 0) {
        snprintf(why, whylen, "cannot set %s in the request body", key);
        return -1;
    }
    return 0;
}

int llmsup_add_logit_bias(json_t *body, unsigned long token, double bias) {
    json_t *biases = json_object_get(body, "logit_bias");
    if (!biases) {
        biases = json_object();
        if (!biases || json_object_set_new(body, "logit_bias", biases) != 0) return -1;
    }
    if (!json_is_object(biases)) return -1;
    char key[32]; /* a token id as a decimal string (SPEC.md 3.1) */
    snprintf(key, sizeof key, "%lu", token);
    return json_object_set_new(biases, key, json_real(bias)) == 0 ? 0 : -1;
}

const char *llmsup_finish_reason(const json_t *done) {
    const json_t *reason = json_object_get(done, "finish_reason");
    return json_is_string(reason) ? json_string_value(reason) : "";
}

static const char *string_member(const json_t *object, const char *key) {
    const json_t *value = json_object_get(object, key);
    return json_is_string(value) ? json_string_value(value) : "";
}

size_t llmsup_tool_calls(const json_t *done, llmsup_tool_call *calls, size_t max) {
    const json_t *list = json_object_get(done, "tool_calls");
    if (!json_is_array(list)) return 0;
    size_t n = json_array_size(list);
    for (size_t i = 0; i < n && i < max; i++) {
        const json_t *call = json_array_get(list, i);
        const json_t *function = json_object_get(call, "function");
        calls[i].id = string_member(call, "id");
        calls[i].name = string_member(function, "name");
        calls[i].arguments = string_member(function, "arguments");
    }
    return n;
}
