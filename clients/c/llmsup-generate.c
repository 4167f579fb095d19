/* llmsup-generate: stream a completion (or a chat answer, or token ids) to stdout.
 *
 *   llmsup-generate [options] PROMPT
 *
 * -m NAME asks for one of the models the server serves (its `model` field, SPEC.md 3.1;
 * without it, the server's default). While the model loads, it says so once on stderr.
 *
 * The sampling knobs (SPEC.md 3.1) have options of their own, --json-schema and --grammar
 * read files (3.11), and a chat takes --tools FILE with --tool-choice (3.12): a DONE with
 * tool calls prints each as "call NAME(ARGUMENTS) [ID]" on stdout. --choices N asks for N
 * completions of the prompt (the body's "n", SPEC.md 3.16): their pieces interleave, so
 * each is printed whole under a "--- choice I: FINISH, K tokens" line at the end.
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

/* The tool calls of a DONE or of one of its choices (SPEC.md 3.12): one line each. */
static void print_calls(const json_t *answer) {
    llmsup_tool_call calls[8];
    size_t ncalls = llmsup_tool_calls(answer, calls, 8);
    for (size_t i = 0; i < ncalls && i < 8; i++)
        printf("call %s(%s) [%s]\n", calls[i].name, calls[i].arguments, calls[i].id);
    if (ncalls > 8) printf("(%zu more calls)\n", ncalls - 8);
}

/* One completion's text, as its frames arrive. */
typedef struct {
    char *text;
    size_t len, cap;
} buffer;

/* What the callbacks of one run share. */
typedef struct {
    long tokens;      /* token frames received */
    int verbose;      /* --verbose */
    int told_loading; /* "waiting for model X to load" was said */
    buffer *choices;  /* with "n" above 1: each completion's text, by index */
    int nchoices;
} progress;

/* A frame of one of n completions: kept until the end (frames of several interleave). */
static int keep_choice_token(int index, const char *text, size_t len, void *user) {
    progress *p = user;
    ++p->tokens;
    if (index < 0 || index >= p->nchoices) return 0; /* not one we asked for */
    buffer *b = &p->choices[index];
    if (b->len + len + 1 > b->cap) {
        size_t cap = (b->len + len + 1) * 2;
        char *grown = realloc(b->text, cap);
        if (!grown) return 0;
        b->text = grown;
        b->cap = cap;
    }
    memcpy(b->text + b->len, text, len);
    b->len += len;
    b->text[b->len] = '\0';
    return 0;
}

/* DONE of a request of n completions: each one's text under a header, and its calls. */
static void print_choices(const progress *p, const json_t *done) {
    size_t i;
    json_t *choice;
    json_array_foreach(json_object_get(done, "choices"), i, choice) {
        json_int_t index = json_integer_value(json_object_get(choice, "index"));
        printf("--- choice %lld: %s, %lld tokens\n", (long long)index,
               llmsup_finish_reason(choice),
               (long long)json_integer_value(json_object_get(choice, "completion_tokens")));
        if (index >= 0 && index < p->nchoices && p->choices[index].text)
            fwrite(p->choices[index].text, 1, p->choices[index].len, stdout);
        printf("\n");
        print_calls(choice);
    }
}

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
          "      --choices N        N completions of the prompt (the body's n, SPEC.md 3.16),\n"
          "                         printed one after another at the end\n"
          "      --top-p X, --top-k N, --min-p X\n"
          "      --presence-penalty X, --frequency-penalty X, --repeat-penalty X\n"
          "      --repeat-last-n N  the sampling knobs of SPEC.md 3.1 (a negative value\n"
          "                         as --presence-penalty=-0.5)\n"
          "      --logit-bias TOKEN=BIAS  add BIAS (-100 to 100) to TOKEN's logit (repeatable)\n"
          "      --json-schema FILE the output must match this JSON Schema (SPEC.md 3.11)\n"
          "      --grammar FILE     the output must match this GBNF grammar (SPEC.md 3.11)\n"
          "      --tools FILE       with --chat: a JSON list of tools the model may call\n"
          "      --tool-choice C    none, auto, required, or the name of one of the tools\n"
          "      --parallel-tool-calls  the answer may hold several calls\n"
          "  -p, --param KEY=JSON   any other body member, its value as JSON (repeatable)\n"
          "      --chat             send PROMPT as a user message of a chat\n"
          "      --tokenize         print PROMPT's token ids instead\n"
          "      --embed            print PROMPT's embedding vector instead\n"
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

/* --logit-bias TOKEN=BIAS: a token id and a number. */
static int add_logit_bias(json_t *body, const char *arg) {
    const char *eq = strchr(arg, '=');
    char *end = NULL;
    unsigned long token = 0;
    double bias = 0;
    int ok = eq && eq > arg && strspn(arg, "0123456789") == (size_t)(eq - arg);
    if (ok) {
        errno = 0;
        token = strtoul(arg, &end, 10);
        ok = errno == 0 && end == eq;
    }
    if (ok) {
        bias = strtod(eq + 1, &end);
        ok = end != eq + 1 && *end == '\0';
    }
    if (!ok) {
        fprintf(stderr, "llmsup-generate: --logit-bias wants TOKEN=BIAS (e.g. 1234=-100), got %s\n",
                arg);
        return -1;
    }
    return llmsup_add_logit_bias(body, token, bias);
}

/* --tool-choice: none, auto and required as they are; anything else names a tool. */
static void set_tool_choice(json_t *body, const char *choice) {
    json_t *value;
    if (strcmp(choice, "none") == 0 || strcmp(choice, "auto") == 0 ||
        strcmp(choice, "required") == 0)
        value = json_string(choice);
    else
        value = json_pack("{s:s,s:{s:s}}", "type", "function", "function", "name", choice);
    json_object_set_new(body, "tool_choice", value);
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
    enum { OPT_SEED = 1000, OPT_CHAT, OPT_TOKENIZE, OPT_EMBED, OPT_SERVER_KEY, OPT_PUBLIC_KEY,
           OPT_SECRET_KEY, OPT_JSON_SCHEMA, OPT_GRAMMAR, OPT_TOOLS, OPT_TOOL_CHOICE,
           OPT_PARALLEL, OPT_LOGIT_BIAS, OPT_TOP_P, OPT_TOP_K, OPT_MIN_P, OPT_PRESENCE,
           OPT_FREQUENCY, OPT_REPEAT, OPT_REPEAT_LAST_N, OPT_CHOICES };
    /* The knobs whose value goes into the body as JSON (a number), by option. */
    static const struct { int opt; const char *key; } knobs[] = {
        {OPT_TOP_P, "top_p"},
        {OPT_TOP_K, "top_k"},
        {OPT_MIN_P, "min_p"},
        {OPT_PRESENCE, "presence_penalty"},
        {OPT_FREQUENCY, "frequency_penalty"},
        {OPT_REPEAT, "repeat_penalty"},
        {OPT_REPEAT_LAST_N, "repeat_last_n"},
    };
    static const struct option longopts[] = {
        {"endpoint", required_argument, 0, 'e'},   {"state-dir", required_argument, 0, 's'},
        {"max-tokens", required_argument, 0, 'n'}, {"temperature", required_argument, 0, 't'},
        {"seed", required_argument, 0, OPT_SEED},  {"param", required_argument, 0, 'p'},
        {"choices", required_argument, 0, OPT_CHOICES},
        {"chat", no_argument, 0, OPT_CHAT},        {"tokenize", no_argument, 0, OPT_TOKENIZE},
        {"embed", no_argument, 0, OPT_EMBED},
        {"attempts", required_argument, 0, 'a'},   {"timeout-ms", required_argument, 0, 'T'},
        {"verbose", no_argument, 0, 'v'},          {"help", no_argument, 0, 'h'},
        {"model", required_argument, 0, 'm'},      {"server-key", required_argument, 0,
                                                    OPT_SERVER_KEY},
        {"public-key", required_argument, 0, OPT_PUBLIC_KEY},
        {"secret-key", required_argument, 0, OPT_SECRET_KEY},
        {"json-schema", required_argument, 0, OPT_JSON_SCHEMA},
        {"grammar", required_argument, 0, OPT_GRAMMAR},
        {"tools", required_argument, 0, OPT_TOOLS},
        {"tool-choice", required_argument, 0, OPT_TOOL_CHOICE},
        {"parallel-tool-calls", no_argument, 0, OPT_PARALLEL},
        {"logit-bias", required_argument, 0, OPT_LOGIT_BIAS},
        {"top-p", required_argument, 0, OPT_TOP_P},
        {"top-k", required_argument, 0, OPT_TOP_K},
        {"min-p", required_argument, 0, OPT_MIN_P},
        {"presence-penalty", required_argument, 0, OPT_PRESENCE},
        {"frequency-penalty", required_argument, 0, OPT_FREQUENCY},
        {"repeat-penalty", required_argument, 0, OPT_REPEAT},
        {"repeat-last-n", required_argument, 0, OPT_REPEAT_LAST_N},
        {0, 0, 0, 0}};
    const char *explicit_keys[3] = {NULL, NULL, NULL};
    const char *endpoint = getenv("LLMSUP_ENDPOINT");
    const char *state_dir = NULL;
    const char *verb = "complete";
    int attempts = 5, timeout_ms = LLMSUP_RECEIVE_TIMEOUT_MS, verbose = 0, opt;
    json_t *params = json_object();
    char why[512];

    while ((opt = getopt_long(argc, argv, "e:s:m:n:t:p:a:T:vh", longopts, NULL)) != -1) {
        char *eq;
        const char *knob = NULL;
        for (size_t i = 0; i < sizeof knobs / sizeof knobs[0]; i++)
            if (knobs[i].opt == opt) knob = knobs[i].key;
        if (knob) {
            if (set_json_param(params, knob, optarg)) return 2;
            continue;
        }
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
        case OPT_CHOICES:
            if (set_json_param(params, "n", optarg)) return 2;
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
        case OPT_JSON_SCHEMA: /* SPEC.md 3.11: the output must match this schema */
            if (llmsup_set_json_file(params, "json_schema", optarg, why, sizeof why)) {
                fprintf(stderr, "llmsup-generate: --json-schema: %s\n", why);
                return 2;
            }
            break;
        case OPT_GRAMMAR: /* a GBNF grammar, as text */
            if (llmsup_set_text_file(params, "grammar", optarg, why, sizeof why)) {
                fprintf(stderr, "llmsup-generate: --grammar: %s\n", why);
                return 2;
            }
            break;
        case OPT_TOOLS: /* SPEC.md 3.12: a JSON list of {"type": "function", ...} */
            if (llmsup_set_json_file(params, "tools", optarg, why, sizeof why)) {
                fprintf(stderr, "llmsup-generate: --tools: %s\n", why);
                return 2;
            }
            break;
        case OPT_TOOL_CHOICE: set_tool_choice(params, optarg); break;
        case OPT_PARALLEL: json_object_set_new(params, "parallel_tool_calls", json_true()); break;
        case OPT_LOGIT_BIAS:
            if (add_logit_bias(params, optarg)) return 2;
            break;
        case OPT_CHAT: verb = "chat"; break;
        case OPT_TOKENIZE: verb = "tokenize"; break;
        case OPT_EMBED: verb = "embed"; break;
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

    char found[1024];
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
        const char *key = strcmp(verb, "tokenize") == 0 ? "text"
                          : strcmp(verb, "embed") == 0  ? "input"
                                                         : "prompt";
        json_object_set_new(body, key, text);
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
    /* "n" (--choices or --param): the server refuses more than 64, or more than its slots */
    json_int_t n = json_integer_value(json_object_get(body, "n"));
    if (n > 1 && n <= 64) {
        run.nchoices = (int)n;
        run.choices = calloc((size_t)n, sizeof *run.choices);
        if (!run.choices) {
            fprintf(stderr, "llmsup-generate: out of memory\n");
            json_decref(body);
            llmsup_close(client);
            return 4;
        }
        opts.on_choice_token = keep_choice_token;
    }
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
            } else if (strcmp(verb, "embed") == 0) { /* SPEC.md 3.15: one vector, one line */
                size_t i;
                json_t *x;
                json_t *vector = json_array_get(json_object_get(done, "embeddings"), 0);
                json_array_foreach(vector, i, x) printf(i ? " %.6g" : "%.6g", json_number_value(x));
                printf("\n");
                fprintf(stderr, "[embed: dimensions=%lld prompt_tokens=%lld pooling=%s]\n",
                        (long long)json_integer_value(json_object_get(done, "dimensions")),
                        (long long)json_integer_value(
                            json_object_get(json_object_get(done, "usage"), "prompt_tokens")),
                        json_string_value(json_object_get(done, "pooling")));
            } else {
                if (run.nchoices > 1)
                    print_choices(&run, done);
                else
                    print_calls(done); /* a chat with tools answered with calls */
                json_t *usage = json_object_get(done, "usage");
                fprintf(stderr, "\n[%s: prompt_tokens=%lld completion_tokens=%lld cached_tokens=%lld]\n",
                        llmsup_finish_reason(done),
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
    for (int i = 0; i < run.nchoices; i++) free(run.choices[i].text);
    free(run.choices);
    json_decref(done);
    json_decref(body);
    llmsup_close(client);
    return status;
}
