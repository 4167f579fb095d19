#!/usr/bin/env node
'use strict';
// llmsup-generate: stream a completion (or a chat answer, or token ids) to stdout.
// The same options and exit status as the C example (clients/c/llmsup-generate.c):
// 0 done; 1 the server answered an error; 2 usage; 3 still overloaded after every
// attempt; 4 no reply in time or a local failure; 130 cancelled (Ctrl-C sends `cancel`
// and waits for the request's terminal frame; a second Ctrl-C exits at once). When no
// frame comes for --timeout-ms, it pings the server and says whether the server is down,
// restarted (a new instance: the request is lost) or still the same (SPEC.md 4.1).
// -m NAME asks for one of the models the server serves (its `model` field, SPEC.md 3.1);
// while that model loads, it says so once on stderr. The sampling knobs (SPEC.md 3.1)
// have options of their own, --json-schema and --grammar read files (3.11), and a chat
// takes --tools FILE with --tool-choice (3.12): a DONE with tool calls prints each as
// "call NAME(ARGUMENTS) [ID]" on stdout. --choices N asks for N completions of the prompt
// (the body's `n`, SPEC.md 3.16): their pieces interleave, so each is printed whole under a
// "--- choice I: FINISH, K tokens" line once the request has ended.
const fs = require('node:fs');
const { parseArgs } = require('node:util');
const { Client, LlmsupError, TimeoutError, RECEIVE_TIMEOUT_MS } = require('../llmsup');

const USAGE = `usage: llmsup-generate [options] PROMPT
  -e, --endpoint URL     server endpoint (default: $LLMSUP_ENDPOINT, else the
                         running supervisor's, from the state dir)
  -s, --state-dir DIR    state dir to find the supervisor in (and, for a tcp
                         endpoint, its CURVE keys)
      --server-key=Z85, --public-key=Z85, --secret-key=Z85 (with =: a key may start with -)
                         CURVE keys for a tcp endpoint (default: the state dir's)
  -m, --model NAME       a model the server serves (default: the server's default)
  -n, --max-tokens N     most tokens to generate
  -t, --temperature X    0 is greedy
      --seed N           sampler seed
      --choices N        N completions of the prompt (the body's n, SPEC.md 3.16),
                         printed one after another at the end
      --top-p X, --top-k N, --min-p X
      --presence-penalty X, --frequency-penalty X, --repeat-penalty X
      --repeat-last-n N  the sampling knobs of SPEC.md 3.1 (a negative value
                         as --presence-penalty=-0.5)
      --logit-bias TOKEN=BIAS  add BIAS (-100 to 100) to TOKEN's logit (repeatable)
      --json-schema FILE the output must match this JSON Schema (SPEC.md 3.11)
      --grammar FILE     the output must match this GBNF grammar (SPEC.md 3.11)
      --tools FILE       with --chat: a JSON list of tools the model may call
      --tool-choice C    none, auto, required, or the name of one of the tools
      --parallel-tool-calls  the answer may hold several calls
  -p, --param KEY=JSON   any other body member, its value as JSON (repeatable)
      --chat             send PROMPT as a user message of a chat
      --tokenize         print PROMPT's token ids instead
      --embed            print PROMPT's embedding vector instead
  -a, --attempts N       tries in all while the server is overloaded (default 5)
  -T, --timeout-ms N     longest wait for the next reply frame (default ${RECEIVE_TIMEOUT_MS})
  -v, --verbose          print accepted, queued and running frames on stderr
`;

function fail(message, status) {
  process.stderr.write(`llmsup-generate: ${message}\n`);
  process.exit(status);
}

// The knobs whose value goes into the body as JSON (a number), by option.
const KNOBS = {
  'top-p': 'top_p',
  'top-k': 'top_k',
  'min-p': 'min_p',
  'presence-penalty': 'presence_penalty',
  'frequency-penalty': 'frequency_penalty',
  'repeat-penalty': 'repeat_penalty',
  'repeat-last-n': 'repeat_last_n',
};

/** A file's text, or exit 2 naming the option. */
function readFile(option, file) {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (err) {
    return fail(`--${option}: ${err.message}`, 2);
  }
}

/** --tool-choice: none, auto and required as they are; anything else names a tool. */
function toolChoice(choice) {
  return ['none', 'auto', 'required'].includes(choice)
    ? choice
    : { type: 'function', function: { name: choice } };
}

function parse() {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        endpoint: { type: 'string', short: 'e' },
        'state-dir': { type: 'string', short: 's' },
        model: { type: 'string', short: 'm' },
        'max-tokens': { type: 'string', short: 'n' },
        temperature: { type: 'string', short: 't' },
        seed: { type: 'string' },
        choices: { type: 'string' },
        'json-schema': { type: 'string' },
        grammar: { type: 'string' },
        tools: { type: 'string' },
        'tool-choice': { type: 'string' },
        'parallel-tool-calls': { type: 'boolean' },
        'logit-bias': { type: 'string', multiple: true },
        ...Object.fromEntries(Object.keys(KNOBS).map((k) => [k, { type: 'string' }])),
        param: { type: 'string', short: 'p', multiple: true },
        chat: { type: 'boolean' },
        tokenize: { type: 'boolean' },
        embed: { type: 'boolean' },
        attempts: { type: 'string', short: 'a', default: '5' },
        'timeout-ms': { type: 'string', short: 'T', default: String(RECEIVE_TIMEOUT_MS) },
        verbose: { type: 'boolean', short: 'v' },
        help: { type: 'boolean', short: 'h' },
        'server-key': { type: 'string' },
        'public-key': { type: 'string' },
        'secret-key': { type: 'string' },
      },
    });
  } catch (err) {
    process.stderr.write(`${err.message}\n${USAGE}`);
    process.exit(2);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  const attempts = Number(values.attempts);
  const timeoutMs = Number(values['timeout-ms']);
  if (positionals.length !== 1 || !(attempts >= 1) || !(timeoutMs >= 1)) {
    process.stderr.write(USAGE);
    process.exit(2);
  }
  const params = {};
  const setJson = (key, text, name = key) => {
    try {
      params[key] = JSON.parse(text);
    } catch (err) {
      fail(`${name}: not JSON: ${err.message}`, 2);
    }
  };
  if (values['max-tokens'] !== undefined) setJson('max_tokens', values['max-tokens']);
  if (values.temperature !== undefined) setJson('temperature', values.temperature);
  if (values.seed !== undefined) setJson('seed', values.seed);
  if (values.choices !== undefined) setJson('n', values.choices, '--choices');
  if (values.model !== undefined) params.model = values.model; // a string, not JSON
  for (const [option, key] of Object.entries(KNOBS)) {
    if (values[option] !== undefined) setJson(key, values[option]);
  }
  for (const item of values['logit-bias'] ?? []) {
    const match = /^(\d+)=(.+)$/.exec(item);
    const bias = match ? Number(match[2]) : NaN;
    if (!match || !Number.isFinite(bias) || match[2].trim() !== match[2]) {
      fail(`--logit-bias wants TOKEN=BIAS (e.g. 1234=-100), got ${item}`, 2);
    }
    params.logit_bias ??= {};
    params.logit_bias[String(BigInt(match[1]))] = bias; // a token id as a decimal string
  }
  if (values['json-schema'] !== undefined) {
    setJson('json_schema', readFile('json-schema', values['json-schema']), '--json-schema');
  }
  if (values.grammar !== undefined) params.grammar = readFile('grammar', values.grammar);
  if (values.tools !== undefined) setJson('tools', readFile('tools', values.tools), '--tools');
  if (values['tool-choice'] !== undefined) params.tool_choice = toolChoice(values['tool-choice']);
  if (values['parallel-tool-calls']) params.parallel_tool_calls = true;
  for (const item of values.param ?? []) {
    const eq = item.indexOf('=');
    if (eq < 0) fail(`--param wants KEY=JSON, got ${item}`, 2);
    setJson(item.slice(0, eq), item.slice(eq + 1));
  }
  const verb = values.tokenize
    ? 'tokenize'
    : values.embed
      ? 'embed'
      : values.chat
        ? 'chat'
        : 'complete';
  return { values, prompt: positionals[0], params, verb, attempts, timeoutMs };
}

/** A chat with tools answered with calls (SPEC.md 3.12): one line per call. */
function printCalls(calls) {
  for (const call of calls) {
    process.stdout.write(`call ${call.function.name}(${call.function.arguments}) [${call.id}]\n`);
  }
}

async function main() {
  const { values, prompt, params, verb, attempts, timeoutMs } = parse();
  let client;
  try {
    const given = ['server-key', 'public-key', 'secret-key'].map((k) => values[k]);
    let curveKeys;
    if (given.some((k) => k !== undefined)) {
      if (!given.every((k) => typeof k === 'string' && k.length === 40)) {
        fail('--server-key, --public-key and --secret-key go together, each 40 Z85 chars', 2);
      }
      curveKeys = { serverKey: given[0], publicKey: given[1], secretKey: given[2] };
    }
    client = new Client({
      endpoint: values.endpoint,
      stateDir: values['state-dir'],
      timeoutMs,
      curveKeys,
    });
  } catch (err) {
    fail(err.message, 4);
  }
  const controller = new AbortController();
  process.once('SIGINT', () => {
    controller.abort();
    process.once('SIGINT', () => process.exit(130)); // a second Ctrl-C
  });

  // Each non-terminal frame other than a token. --verbose: as "[kind] {body}" on stderr.
  // A `queued` frame with `loading` (its model is loading, SPEC.md 4): said once.
  let toldLoading = false;
  const onEvent = (kind, body) => {
    if (values.verbose) process.stderr.write(`[${kind}] ${JSON.stringify(body)}\n`);
    if (kind === 'queued' && typeof body.loading === 'string' && !toldLoading) {
      process.stderr.write(`llmsup-generate: waiting for model ${body.loading} to load\n`);
      toldLoading = true;
    }
  };
  let status = 0;
  let completion = null;
  try {
    if (verb === 'tokenize') {
      const body = { text: prompt, ...params };
      const done = await callWithRetry(client, 'tokenize', body, attempts, onEvent);
      process.stdout.write(`${done.tokens.join(' ')}\n`);
    } else if (verb === 'embed') {
      const body = { input: prompt, ...params };
      const done = await callWithRetry(client, 'embed', body, attempts, onEvent);
      const vector = done.embeddings[0].map((x) => Number(x.toPrecision(6)));
      process.stdout.write(`${vector.join(' ')}\n`);
      process.stderr.write(
        `[embed: dimensions=${done.dimensions} prompt_tokens=${done.usage.prompt_tokens} ` +
          `pooling=${done.pooling}]\n`,
      );
    } else {
      completion =
        verb === 'chat'
          ? client.chat([{ role: 'user', content: prompt }], params, options())
          : client.complete(prompt, params, options());
      const several = Number(params.n) > 1;
      for await (const text of completion) if (!several) process.stdout.write(text);
      const { usage } = completion.done;
      const reason = completion.finishReason;
      if (several) {
        const texts = await completion.choices();
        for (const choice of completion.done.choices) {
          process.stdout.write(
            `--- choice ${choice.index}: ${choice.finish_reason}, ` +
              `${choice.completion_tokens} tokens\n${texts[choice.index]}\n`,
          );
          printCalls(choice.tool_calls ?? []);
        }
      } else {
        printCalls(completion.toolCalls);
      }
      process.stderr.write(
        `\n[${reason}: prompt_tokens=${usage.prompt_tokens} ` +
          `completion_tokens=${usage.completion_tokens} ` +
          `cached_tokens=${usage.cached_tokens ?? 0}]\n`,
      );
      if (controller.signal.aborted) status = 130; // it finished before the cancel landed
    }
  } catch (err) {
    status = report(err, completion);
    if (err instanceof TimeoutError && !controller.signal.aborted) {
      await diagnoseTimeout(client, err.instance);
    }
  } finally {
    client.close();
  }
  process.exitCode = status;

  function options() {
    return {
      signal: controller.signal,
      maxAttempts: attempts,
      onEvent,
      onRetry: (err, next) =>
        process.stderr.write(
          `llmsup-generate: overloaded; retrying in ${err.retryAfterMs} ms ` +
            `(attempt ${next} of ${attempts})\n`,
        ),
    };
  }
}

/** SPEC 4.1, after a timeout: ping, and say what became of the request. */
async function diagnoseTimeout(client, before) {
  let pong;
  try {
    pong = await client.ping();
  } catch {
    process.stderr.write(
      'llmsup-generate: no answer to ping either: the server is down or unreachable, ' +
        'and the request is lost\n',
    );
    return;
  }
  const now = pong.instance;
  if (!before) {
    process.stderr.write(
      `llmsup-generate: the server (instance ${now}) answers ping but never acknowledged ` +
        'the request: it is lost\n',
    );
  } else if (before !== now) {
    process.stderr.write(
      `llmsup-generate: the server restarted (instance ${before}, now ${now}): the request ` +
        'is lost; run it again\n',
    );
  } else {
    process.stderr.write(
      `llmsup-generate: the server (instance ${now}) is up but sent nothing for the ` +
        'request: it was lost with the connection; run it again\n',
    );
  }
}

/** tokenize and embed have no stream; the same overload handling, by hand. */
async function callWithRetry(client, verb, body, attempts, onEvent) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await client.call(verb, body, { onEvent });
    } catch (err) {
      const retriable = err instanceof LlmsupError && err.code === 'overloaded';
      if (!retriable || err.retryAfterMs === null || attempt >= attempts) throw err;
      process.stderr.write(
        `llmsup-generate: overloaded; retrying in ${err.retryAfterMs} ms ` +
          `(attempt ${attempt + 1} of ${attempts})\n`,
      );
      await new Promise((resolve) => setTimeout(resolve, err.retryAfterMs));
    }
  }
}

function report(err, completion) {
  if (!(err instanceof LlmsupError)) {
    process.stderr.write(`llmsup-generate: ${err.message}\n`);
    return 4;
  }
  if (err.code === 'cancelled') {
    const tokens = completion ? completion.tokens : 0;
    process.stderr.write(`\nllmsup-generate: cancelled after ${tokens} token frames\n`);
    return 130;
  }
  if (err.code === 'overloaded') {
    process.stderr.write(
      `llmsup-generate: overloaded: ${err.body.message} (retry_after_ms=${err.retryAfterMs}); ` +
        'gave up\n',
    );
    return 3;
  }
  const field = err.field ? ` (field ${err.field})` : '';
  process.stderr.write(`llmsup-generate: error ${err.code}: ${err.body.message}${field}\n`);
  return 1;
}

main();
