/* llmsup-generate: stream a completion (or a chat answer, or token ids) to stdout.
 *
 *   llmsup-generate [options] PROMPT
 *
 * -m NAME asks for one of the models the server serves (its `model` field, SPEC.md 3.1;
 * without it, the server's default). While the model loads, it says so once on stderr.
 *
 * Retries a request refused as `overloaded` after the server's retry_after_ms, at most
 * --attempts times in all. Ctrl-C cancels the request in flight (the `cancel` verb) and
 * waits for its terminal frame; a second Ctrl-C exits at once. When no frame comes for
 * --timeout-ms, it pings the server and says whether the server is down, restarted (a new
 * instance: the request is lost) or still the same (SPEC.md 4.1).
 *
 * Exit status: 0 done; 1 the server answered an error; 2 usage; 3 still overloaded after
 * every attempt; 4 no reply in time or a local failure; 130 cancelled.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "llmsup.h"

static volatile sig_atomic_t interrupted = 0;

static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
}

/* What the callbacks of one run share. */
typedef struct {
    long tokens;      /* token frames received */
    int verbose;      /* --verbose */
    int told_loading; /* "waiting for model X to load" was said */
} progress;

static int print_token(const char *text, size_t len, void *user) {
    progress *p = user;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    ++p->tokens;
    return 0;
}

/* Each non-terminal frame other than a token. --verbose: as "[kind] {body}" on stderr.
 * A `queued` frame with "loading" (its model is loading, SPEC.md 4): said once. */
static int print_event(const char *kind, const json_t *body, void *user) {
    progress *p = user;
    if (p->verbose) {
        char *json = json_dumps(body, JSON_COMPACT);
        fprintf(stderr, "[%s] %s\n", kind, json ? json : "{}");
        free(json);
    }
    const json_t *loading = json_object_get(body, "loading");
    if (strcmp(kind, "queued") == 0 && json_is_string(loading) && !p->told_loading) {
        fprintf(stderr, "llmsup-generate: waiting for model %s to load\n",
                json_string_value(loading));
        p->told_loading = 1;
    }
    return 0;
}

/* SPEC 4.1, after a timeout: ping, and say what became of the request. */
static void diagnose_timeout(llmsup_client *client) {
    char before[LLMSUP_MAX_INSTANCE + 1];
    snprintf(before, sizeof before, "%s", llmsup_instance(client));
    llmsup_error err;
    json_t *pong = NULL;
    if (llmsup_request(client, "ping", NULL, NULL, &pong, &err) != LLMSUP_OK) {
        fprintf(stderr, "llmsup-generate: no answer to ping either: the server is down or "
                        "unreachable, and the request is lost\n");
        return;
    }
    const char *now = llmsup_instance(client);
    if (!before[0]) {
        fprintf(stderr, "llmsup-generate: the server (instance %s) answers ping but never "
                        "acknowledged the request: it is lost\n", now);
    } else if (strcmp(before, now) != 0) {
        fprintf(stderr, "llmsup-generate: the server restarted (instance %s, now %s): the "
                        "request is lost; run it again\n", before, now);
    } else {
        fprintf(stderr, "llmsup-generate: the server (instance %s) is up but sent nothing for "
                        "the request: it was lost with the connection; run it again\n", now);
    }
    json_decref(pong);
}

static void usage(FILE *out) {
    fputs("usage: llmsup-generate [options] PROMPT\n"
          "  -e, --endpoint URL     server endpoint (default: $LLMSUP_ENDPOINT, else the\n"
          "                         running supervisor's, from the state dir)\n"
          "  -s, --state-dir DIR    state dir to find the supervisor in (and, for a tcp\n"
          "                         endpoint, its CURVE keys)\n"
          "      --server-key=Z85, --public-key=Z85, --secret-key=Z85 (with =: a key may start with -)\n"
          "                         CURVE keys for a tcp endpoint (default: the state dir's)\n"
          "  -m, --model NAME       a model the server serves (default: the server's default)\n"
          "  -n, --max-tokens N     most tokens to generate\n"
          "  -t, --temperature X    0 is greedy\n"
          "      --seed N           sampler seed\n"
          "      --json-schema FILE the output must match this JSON Schema (SPEC.md 3.11)\n"
          "  -p, --param KEY=JSON   any other body member, its value as JSON (repeatable):\n"
          "                         min_p, penalties, logit_bias, grammar, tools, ...\n"
          "      --chat             send PROMPT as a user message of a chat\n"
          "      --tokenize         print PROMPT's token ids instead\n"
          "  -a, --attempts N       tries in all while the server is overloaded (default 5)\n"
          "  -T, --timeout-ms N     longest wait for the next reply frame (default 5000)\n"
          "  -v, --verbose          print accepted, queued and running frames on stderr\n",
          out);
}

static int set_json_param(json_t *body, const char *key, const char *json_text) {
    json_error_t jerr;
    json_t *value = json_loads(json_text, JSON_DECODE_ANY, &jerr);
    if (!value) {
        fprintf(stderr, "llmsup-generate: %s: not JSON: %s\n", key, jerr.text);
        return -1;
    }
    json_object_set_new(body, key, value);
    return 0;
}

/* Sleep ms milliseconds unless interrupted; returns nonzero if interrupted. */
static int sleep_ms(long ms) {
    while (ms > 0 && !interrupted) {
        long step = ms < 50 ? ms : 50;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = step * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
    return interrupted;
}

int main(int argc, char **argv) {
    enum { OPT_SEED = 1000, OPT_CHAT, OPT_TOKENIZE, OPT_SERVER_KEY, OPT_PUBLIC_KEY,
           OPT_SECRET_KEY, OPT_JSON_SCHEMA };
    static const struct option longopts[] = {
        {"endpoint", required_argument, 0, 'e'},   {"state-dir", required_argument, 0, 's'},
        {"max-tokens", required_argument, 0, 'n'}, {"temperature", required_argument, 0, 't'},
        {"seed", required_argument, 0, OPT_SEED},  {"param", required_argument, 0, 'p'},
        {"chat", no_argument, 0, OPT_CHAT},        {"tokenize", no_argument, 0, OPT_TOKENIZE},
        {"attempts", required_argument, 0, 'a'},   {"timeout-ms", required_argument, 0, 'T'},
        {"verbose", no_argument, 0, 'v'},          {"help", no_argument, 0, 'h'},
        {"model", required_argument, 0, 'm'},      {"server-key", required_argument, 0,
                                                    OPT_SERVER_KEY},
        {"public-key", required_argument, 0, OPT_PUBLIC_KEY},
        {"secret-key", required_argument, 0, OPT_SECRET_KEY},
        {"json-schema", required_argument, 0, OPT_JSON_SCHEMA},
        {0, 0, 0, 0}};
    const char *explicit_keys[3] = {NULL, NULL, NULL};
    const char *endpoint = getenv("LLMSUP_ENDPOINT");
    const char *state_dir = NULL;
    const char *verb = "complete";
    int attempts = 5, timeout_ms = LLMSUP_RECEIVE_TIMEOUT_MS, verbose = 0, opt;
    json_t *params = json_object();

    while ((opt = getopt_long(argc, argv, "e:s:m:n:t:p:a:T:vh", longopts, NULL)) != -1) {
        char *eq;
        switch (opt) {
        case 'e': endpoint = optarg; break;
        case 's': state_dir = optarg; break;
        case 'm': /* a string, not JSON: --param model='"NAME"' says the same */
            if (json_object_set_new(params, "model", json_string(optarg)) != 0) {
                fprintf(stderr, "llmsup-generate: --model: not valid UTF-8\n");
                return 2;
            }
            break;
        case 'n':
            if (set_json_param(params, "max_tokens", optarg)) return 2;
            break;
        case 't':
            if (set_json_param(params, "temperature", optarg)) return 2;
            break;
        case OPT_SEED:
            if (set_json_param(params, "seed", optarg)) return 2;
            break;
        case 'p':
            eq = strchr(optarg, '=');
            if (!eq) {
                fprintf(stderr, "llmsup-generate: --param wants KEY=JSON, got %s\n", optarg);
                return 2;
            }
            *eq = '\0';
            if (set_json_param(params, optarg, eq + 1)) return 2;
            break;
        case OPT_JSON_SCHEMA: { /* SPEC.md 3.11: the output must match this schema */
            json_error_t jerr;
            json_t *schema = json_load_file(optarg, 0, &jerr);
            if (!schema) {
                fprintf(stderr, "llmsup-generate: --json-schema: %s: %s\n", optarg, jerr.text);
                return 2;
            }
            json_object_set_new(params, "json_schema", schema);
            break;
        }
        case OPT_CHAT: verb = "chat"; break;
        case OPT_TOKENIZE: verb = "tokenize"; break;
        case 'a': attempts = atoi(optarg); break;
        case 'T': timeout_ms = atoi(optarg); break;
        case 'v': verbose = 1; break;
        case OPT_SERVER_KEY: explicit_keys[0] = optarg; break;
        case OPT_PUBLIC_KEY: explicit_keys[1] = optarg; break;
        case OPT_SECRET_KEY: explicit_keys[2] = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc - 1 || attempts < 1 || timeout_ms < 1) {
        usage(stderr);
        return 2;
    }
    const char *prompt = argv[optind];

    char found[1024], why[512];
    if (!endpoint || !*endpoint) {
        if (llmsup_find_endpoint(state_dir, found, sizeof found, why, sizeof why) != 0) {
            fprintf(stderr, "llmsup-generate: %s\n", why);
            return 4;
        }
        endpoint = found;
    }

    /* The body: the prompt in the verb's shape, then the parameters. */
    json_t *text = json_string(prompt);
    if (!text) {
        fprintf(stderr, "llmsup-generate: the prompt is not valid UTF-8\n");
        return 2;
    }
    json_t *body = json_object();
    if (strcmp(verb, "chat") == 0) {
        json_object_set_new(body, "messages",
                            json_pack("[{s:s,s:o}]", "role", "user", "content", text));
    } else {
        json_object_set_new(body, strcmp(verb, "tokenize") == 0 ? "text" : "prompt", text);
    }
    json_object_update(body, params);
    json_decref(params);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sa.sa_flags = SA_RESETHAND; /* a second Ctrl-C kills as usual */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);

    llmsup_curve_keys keys, *use_keys = NULL;
    if (explicit_keys[0] || explicit_keys[1] || explicit_keys[2]) {
        for (int i = 0; i < 3; i++) {
            if (!explicit_keys[i] || strlen(explicit_keys[i]) != 40) {
                fprintf(stderr, "llmsup-generate: --server-key, --public-key and --secret-key "
                                "go together, each a 40-character Z85 key\n");
                json_decref(body);
                return 2;
            }
        }
        memcpy(keys.server_key, explicit_keys[0], 41);
        memcpy(keys.public_key, explicit_keys[1], 41);
        memcpy(keys.secret_key, explicit_keys[2], 41);
        use_keys = &keys;
    } else if (strncmp(endpoint, "tcp://", 6) == 0) {
        int rc = llmsup_read_curve_keys(state_dir, &keys, why, sizeof why);
        if (rc < 0) {
            fprintf(stderr, "llmsup-generate: %s\n", why);
            json_decref(body);
            return 4;
        }
        use_keys = rc == 0 ? &keys : NULL;
    }
    llmsup_client *client = llmsup_connect_curve(endpoint, timeout_ms, use_keys);
    if (!client) {
        fprintf(stderr, "llmsup-generate: cannot connect to %s: %s\n", endpoint, strerror(errno));
        json_decref(body);
        return 4;
    }

    progress run = {.verbose = verbose};
    llmsup_stream_opts opts = {.on_token = print_token, .user = &run, .cancel = &interrupted,
                               .on_event = print_event};
    llmsup_error err;
    json_t *done = NULL;
    int status = 0;
    for (int attempt = 1;; attempt++) {
        int rc = llmsup_request(client, verb, body, &opts, &done, &err);
        if (rc == LLMSUP_OK) {
            if (strcmp(verb, "tokenize") == 0) {
                size_t i;
                json_t *id;
                json_array_foreach(json_object_get(done, "tokens"), i, id) {
                    printf(i ? " %lld" : "%lld", (long long)json_integer_value(id));
                }
                printf("\n");
            } else {
                size_t i;
                json_t *call; /* a chat with tools answered with calls (SPEC.md 3.12) */
                json_array_foreach(json_object_get(done, "tool_calls"), i, call) {
                    json_t *fn = json_object_get(call, "function");
                    printf("call %s(%s) [%s]\n", json_string_value(json_object_get(fn, "name")),
                           json_string_value(json_object_get(fn, "arguments")),
                           json_string_value(json_object_get(call, "id")));
                }
                json_t *usage = json_object_get(done, "usage");
                fprintf(stderr, "\n[%s: prompt_tokens=%lld completion_tokens=%lld cached_tokens=%lld]\n",
                        json_string_value(json_object_get(done, "finish_reason")),
                        json_integer_value(json_object_get(usage, "prompt_tokens")),
                        json_integer_value(json_object_get(usage, "completion_tokens")),
                        json_integer_value(json_object_get(usage, "cached_tokens")));
            }
            status = interrupted ? 130 : 0; /* it finished before the cancel landed */
            break;
        }
        if (rc != LLMSUP_ERROR_REPLY) {
            fprintf(stderr, "llmsup-generate: %s\n", llmsup_last_error(client));
            if (rc == LLMSUP_TIMEOUT && !interrupted) diagnose_timeout(client);
            status = 4;
            break;
        }
        if (strcmp(err.code, "cancelled") == 0) {
            fprintf(stderr, "\nllmsup-generate: cancelled after %ld token frames\n", run.tokens);
            status = 130;
            break;
        }
        if (strcmp(err.code, "overloaded") == 0 && err.retry_after_ms >= 0 && run.tokens == 0) {
            if (attempt >= attempts) {
                fprintf(stderr,
                        "llmsup-generate: overloaded: %s (retry_after_ms=%ld); gave up after "
                        "%d attempts\n",
                        err.message, err.retry_after_ms, attempt);
                status = 3;
                break;
            }
            fprintf(stderr, "llmsup-generate: overloaded; retrying in %ld ms (attempt %d of %d)\n",
                    err.retry_after_ms, attempt + 1, attempts);
            if (sleep_ms(err.retry_after_ms)) {
                fprintf(stderr, "llmsup-generate: cancelled while waiting to retry\n");
                status = 130;
                break;
            }
            continue;
        }
        fprintf(stderr, "llmsup-generate: error %s: %s", err.code, err.message);
        if (err.field[0]) fprintf(stderr, " (field %s)", err.field);
        fprintf(stderr, "\n");
        status = 1;
        break;
    }
    json_decref(done);
    json_decref(body);
    llmsup_close(client);
    return status;
}
