'use strict';
/**
 * A Node.js client for the llmsup wire protocol v1 (protocol/SPEC.md), on zeromq v6.
 *
 *   const { Client } = require('./llmsup');
 *   const client = new Client();                  // finds the running supervisor
 *   const completion = client.complete('Once upon a time', { max_tokens: 32 });
 *   for await (const text of completion) process.stdout.write(text);
 *   console.log(completion.done.usage);
 *   client.close();
 *
 * A request names its model with `model` among its params (complete, chat) or options
 * (tokenize): `client.chat(messages, { model: 'smollm2-135m-instruct' })`; without it the
 * server's default model answers, and an unknown name is LlmsupError code "bad_request",
 * field "model". While the model loads, `queued` frames carry `loading` (onEvent).
 *
 * Structured output, sampling knobs and tools (SPEC.md 3.1, 3.11, 3.12) are params too:
 * `min_p`, `presence_penalty`, `frequency_penalty`, `repeat_penalty`, `repeat_last_n`,
 * `logit_bias` ({'<token id>': bias}), `grammar` (GBNF text), `json_schema` (an object),
 * and for chat `tools`, `tool_choice`, `parallel_tool_calls`; messages may be of role
 * `tool` (with `tool_call_id`) or assistant messages with `tool_calls`. A chat the model
 * answered with calls ends with `completion.finishReason` 'tool_calls' and the calls in
 * `completion.toolCalls` ([{id, type: 'function', function: {name, arguments}}]):
 *
 *   const answer = client.chat(messages, { tools, tool_choice: 'required', temperature: 0 });
 *   const text = await answer.text();
 *   for (const { function: f } of answer.toolCalls) run(f.name, JSON.parse(f.arguments));
 *
 * One Client is one DEALER connection; it may carry any number of concurrent requests.
 * Errors from the server are thrown as LlmsupError with `code`, `field`, `retryAfterMs`.
 *
 * Liveness (SPEC.md 4.1): the server sends a frame of every live request at least every
 * 2 s (`accepted` at once, then `queued`/`running` heartbeats and tokens), so `timeoutMs`
 * is a wait per frame, RECEIVE_TIMEOUT_MS (5 s) by default. A TimeoutError means the
 * request, or the server, may be lost: ping, and compare the pong's `instance` with the
 * request's (`completion.instance`); another instance restarted and lost the request.
 */
const fs = require('node:fs');
const path = require('node:path');
const zmq = require('zeromq');

const VERSION = 'LLMSUP1';
/** How long to wait for the next frame of a request before taking it for lost (SPEC 4.1). */
const RECEIVE_TIMEOUT_MS = 5000;

class LlmsupError extends Error {
  /** An `error` reply (SPEC.md section 5). */
  constructor(body) {
    super(`${body.code}: ${body.message}`);
    this.name = 'LlmsupError';
    this.body = body;
    this.code = body.code;
    this.field = body.field ?? null;
    this.retryAfterMs = Number.isInteger(body.retry_after_ms) ? body.retry_after_ms : null;
    this.tokensSent = Number.isInteger(body.tokens_sent) ? body.tokens_sent : null;
  }
}

/** No frame of a request within the receive timeout: it, or the server, may be lost. */
class TimeoutError extends Error {
  constructor(message, { requestId = null, instance = null, timeoutMs = null } = {}) {
    super(message);
    this.name = 'TimeoutError';
    this.code = 'timeout';
    this.requestId = requestId;
    this.instance = instance; // the server instance that accepted the request, if any
    this.timeoutMs = timeoutMs;
  }
}

function timeoutMessage(id, timeoutMs, instance) {
  const from = instance ? `instance ${instance}` : 'the server';
  return (
    `no frame for request ${id} from ${from} in ${timeoutMs} ms: the request, or the ` +
    'server, may be lost; ping the server (another instance restarted and lost the ' +
    'request) and resend it only if it is safe to repeat'
  );
}

/** The state dir of SPEC.md section 1. */
function defaultStateDir() {
  if (process.env.LLMSUP_STATE_DIR) return process.env.LLMSUP_STATE_DIR;
  const xdg = process.env.XDG_RUNTIME_DIR;
  if (xdg) {
    try {
      fs.accessSync(xdg, fs.constants.W_OK);
      return path.join(xdg, 'llmsup');
    } catch {
      // not writable: fall through
    }
  }
  return `/tmp/llmsup-${process.getuid()}`;
}

/** The endpoint of the running supervisor, from STATE_DIR/supervisor.json. */
function findEndpoint(stateDir) {
  const file = path.join(stateDir || defaultStateDir(), 'supervisor.json');
  let info;
  try {
    info = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    throw new Error(`llmsup is not running (cannot read ${file}: ${err.message})`);
  }
  if (typeof info.endpoint !== 'string') throw new Error(`${file} has no "endpoint"`);
  return info.endpoint;
}

/**
 * The CURVE keys a tcp client of this state dir uses (docs/security.md): {serverKey,
 * publicKey, secretKey} as Z85 text from curve-server.pub, curve-client.pub and
 * curve-client.key; null when there are none or the server runs with --tcp-auth none.
 */
function readCurveKeys(stateDir) {
  const dir = stateDir || defaultStateDir();
  try {
    const info = JSON.parse(fs.readFileSync(path.join(dir, 'supervisor.json'), 'utf8'));
    if (info.tcp_auth === 'none') return null;
  } catch {
    // not running, or no info yet: the keys decide
  }
  const read = (name) => {
    const file = path.join(dir, name);
    let key;
    try {
      key = fs.readFileSync(file, 'utf8').trim();
    } catch (err) {
      if (err.code === 'ENOENT') return null;
      throw err;
    }
    if (key.length !== 40) throw new Error(`${file} does not hold a Z85 CURVE key`);
    return key;
  };
  const serverKey = read('curve-server.pub');
  const publicKey = read('curve-client.pub');
  const secretKey = read('curve-client.key');
  if (!serverKey || !publicKey || !secretKey) return null;
  return { serverKey, publicKey, secretKey };
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  });
}

/** The replies of one request id, in arrival order. */
class ReplyQueue {
  constructor() {
    this.items = [];
    this.error = null;
    this.wake = null;
  }
  push(item) {
    this.items.push(item);
    this._wake();
  }
  fail(error) {
    this.error = error;
    this._wake();
  }
  _wake() {
    if (this.wake) {
      const wake = this.wake;
      this.wake = null;
      wake();
    }
  }
  /** The next reply; on a timeout, a TimeoutError from makeError(). */
  async next(timeoutMs, makeError) {
    while (this.items.length === 0) {
      if (this.error) throw this.error;
      let timer;
      const arrived = await new Promise((resolve) => {
        this.wake = () => resolve(true);
        timer = setTimeout(() => resolve(false), timeoutMs);
      });
      clearTimeout(timer);
      if (!arrived && this.items.length === 0 && !this.error) {
        this.wake = null;
        throw makeError();
      }
    }
    return this.items.shift();
  }
}

/**
 * The replies to one `complete` or `chat`: iterate it for the streamed text. After the
 * loop, `done` holds the DONE body. Options:
 *   signal       an AbortSignal: aborting sends `cancel`; the loop then ends with
 *                LlmsupError code "cancelled" (or normally, if the request finished first)
 *   maxAttempts  tries in all while the server answers `overloaded` (default 1); between
 *                tries it waits the server's retry_after_ms
 *   onRetry      called (error, nextAttempt) before each wait
 *   timeoutMs    longest wait for the next frame (default: the client's)
 *   onEvent      called (kind, body) for each non-terminal frame that is not a token:
 *                `accepted`, `queued`, `running`, or a kind added later
 * After `accepted`, `instance` holds the server instance that took the request.
 * Leaving the loop early (break) cancels the request on the server.
 * With `n` above 1 (SPEC.md 3.16) the n completions' pieces interleave: `index` is the
 * completion of the piece just yielded, and `choices()` gives each completion's text.
 */
class Completion {
  constructor(client, verb, body, options = {}) {
    this.client = client;
    this.verb = verb;
    this.body = body;
    this.options = options;
    this.done = null;
    this.tokens = 0;
    this.requestId = null;
    this.instance = null;
    this.index = 0; // the completion the last piece belongs to (n above 1)
    this.byIndex = []; // each completion's text so far
  }

  async *[Symbol.asyncIterator]() {
    const { signal, maxAttempts = 1, onRetry, onEvent } = this.options;
    const { timeoutMs = this.client.timeoutMs } = this.options;
    for (let attempt = 1; ; attempt++) {
      if (signal?.aborted) {
        throw new LlmsupError({ code: 'cancelled', message: 'cancelled before it was sent' });
      }
      const id = this.client._newId();
      this.requestId = id;
      const queue = this.client._register(id);
      let finished = false;
      let cancelSent = false;
      const cancel = () => {
        if (cancelSent || finished) return;
        cancelSent = true;
        this.client.cancel(id).catch(() => {});
      };
      signal?.addEventListener('abort', cancel, { once: true });
      let retry = null;
      try {
        await this.client._send(this.verb, id, this.body);
        if (signal?.aborted) cancel();
        for (;;) {
          const { kind, body } = await queue.next(timeoutMs, () =>
            this.client._timeout(id, timeoutMs, this.instance),
          );
          if (kind === 'token') {
            this.tokens++;
            this.index = Number.isInteger(body.index) ? body.index : 0;
            this.byIndex[this.index] = (this.byIndex[this.index] ?? '') + body.text;
            yield body.text;
          } else if (kind === 'done') {
            finished = true;
            this.done = body;
            return;
          } else if (kind === 'error') {
            finished = true;
            const error = new LlmsupError(body);
            const retriable =
              error.code === 'overloaded' && error.retryAfterMs !== null && this.tokens === 0;
            if (!retriable || attempt >= maxAttempts) throw error;
            retry = error;
            break;
          } else {
            // `accepted`, `queued`, `running`, or a kind added later: not terminal (SPEC 4).
            if (kind === 'accepted') this.instance = this.client._noteInstance(body);
            onEvent?.(kind, body);
          }
        }
      } finally {
        signal?.removeEventListener('abort', cancel);
        this.client._unregister(id);
        if (!finished && !cancelSent) cancel(); // the caller left the loop early
      }
      onRetry?.(retry, attempt + 1);
      await sleep(retry.retryAfterMs, signal);
    }
  }

  /** DONE's finish_reason ('stop', 'length' or 'tool_calls'); null before DONE. */
  get finishReason() {
    return this.done?.finish_reason ?? null;
  }

  /**
   * DONE's tool calls, [{id, type: 'function', function: {name, arguments}}] with
   * `arguments` JSON text valid against the tool's parameters; [] when it has none.
   */
  get toolCalls() {
    return Array.isArray(this.done?.tool_calls) ? this.done.tool_calls : [];
  }

  /** The whole text. */
  async text() {
    let text = '';
    for await (const piece of this) text += piece;
    return text;
  }

  /**
   * Each completion's text, by index, once the request has ended: n of them with `n`
   * above 1 (DONE's `choices` says n; a completion with no frames is ''), else one.
   */
  async choices() {
    if (this.done === null) for await (const piece of this); // eslint-disable-line no-unused-vars
    const n = Array.isArray(this.done?.choices) ? this.done.choices.length : 1;
    return Array.from({ length: n }, (_, i) => this.byIndex[i] ?? '');
  }
}

class Client {
  /**
   * endpoint: ipc://... or tcp://...; default $LLMSUP_ENDPOINT, else the running
   * supervisor's (stateDir, else the default state dir). timeoutMs: the longest wait for
   * the next reply frame of a request. `instance` is the server instance seen last (from
   * an `accepted` frame, a ping or a status); it changes when the server restarts.
   * curveKeys: {serverKey, publicKey, secretKey} (Z85) for a tcp endpoint; by default a
   * tcp endpoint uses the state dir's (readCurveKeys), a server with CURVE needs them.
   */
  constructor({ endpoint, stateDir, timeoutMs = RECEIVE_TIMEOUT_MS, curveKeys } = {}) {
    this.endpoint = endpoint || process.env.LLMSUP_ENDPOINT || findEndpoint(stateDir);
    this.timeoutMs = timeoutMs;
    if (curveKeys === undefined && this.endpoint.startsWith('tcp://')) {
      curveKeys = readCurveKeys(stateDir);
    }
    const curve = curveKeys
      ? {
          curveServerKey: curveKeys.serverKey,
          curvePublicKey: curveKeys.publicKey,
          curveSecretKey: curveKeys.secretKey,
        }
      : {};
    // sendTimeout: with no connection that completed its handshake (a server that is
    // down, or CURVE keys it refuses) a DEALER cannot queue a message, and a send would
    // wait for ever before the receive timeout even starts.
    this.sock = new zmq.Dealer({ linger: 0, sendTimeout: timeoutMs, ...curve });
    this.sock.connect(this.endpoint);
    this.pending = new Map();
    this.prefix = `n${process.pid}-`;
    this.counter = 0;
    this.sending = Promise.resolve();
    this.closed = false;
    this.instance = null;
    this.reader = this._read();
  }

  _noteInstance(body) {
    const instance = typeof body?.instance === 'string' ? body.instance : null;
    if (instance) this.instance = instance;
    return instance;
  }

  _timeout(id, timeoutMs, instance) {
    return new TimeoutError(timeoutMessage(id, timeoutMs, instance), {
      requestId: id,
      instance,
      timeoutMs,
    });
  }

  async _read() {
    try {
      for await (const frames of this.sock) {
        if (frames.length !== 4 || frames[0].toString() !== VERSION) continue;
        const queue = this.pending.get(frames[2].toString('latin1'));
        if (!queue) continue; // the cancel's own `done`, or an abandoned request
        let body;
        try {
          body = JSON.parse(frames[3].toString('utf8'));
        } catch (err) {
          queue.fail(new Error(`reply body is not JSON: ${err.message}`));
          continue;
        }
        queue.push({ kind: frames[1].toString(), body });
      }
    } catch (err) {
      if (!this.closed) for (const queue of this.pending.values()) queue.fail(err);
    }
  }

  _newId() {
    this.counter += 1;
    return `${this.prefix}${this.counter}`;
  }

  _register(id) {
    const queue = new ReplyQueue();
    this.pending.set(id, queue);
    return queue;
  }

  _unregister(id) {
    this.pending.delete(id);
  }

  /** Send one request; zeromq allows one send in progress at a time, so sends queue up. */
  _send(verb, id, body) {
    const frames = [VERSION, verb, id, JSON.stringify(body ?? {})];
    const sent = this.sending.then(() =>
      this.sock.send(frames).catch((err) => {
        // EAGAIN after sendTimeout: nothing took the message; as lost as a silent reply.
        throw err.code === 'EAGAIN' ? this._timeout(id, this.timeoutMs, null) : err;
      }),
    );
    this.sending = sent.catch(() => {});
    return sent;
  }

  /**
   * Stream a completion: `for await (const text of client.complete(prompt, params))`.
   * params: the fields of SPEC.md 3.1, `model` among them (a served model's name).
   */
  complete(prompt, params = {}, options = {}) {
    return new Completion(this, 'complete', { prompt, ...params }, options);
  }

  /**
   * messages: [{role, content}, ...] (a `tool` message also has tool_call_id; an assistant
   * message may have tool_calls); params as complete()'s, and the tool fields (SPEC 3.12).
   */
  chat(messages, params = {}, options = {}) {
    return new Completion(this, 'chat', { messages, ...params }, options);
  }

  /**
   * A request whose only reply is its terminal frame; resolves to the DONE body. onEvent
   * is called (kind, body) for the non-terminal frames (`accepted`, `queued`, `running`).
   */
  async call(verb, body = {}, { timeoutMs = this.timeoutMs, onEvent } = {}) {
    const id = this._newId();
    const queue = this._register(id);
    let instance = null;
    try {
      await this._send(verb, id, body);
      for (;;) {
        const reply = await queue.next(timeoutMs, () => this._timeout(id, timeoutMs, instance));
        if (reply.kind === 'done') {
          this._noteInstance(reply.body); // ping and status carry it
          return reply.body;
        }
        if (reply.kind === 'error') throw new LlmsupError(reply.body);
        if (reply.kind === 'accepted') instance = this._noteInstance(reply.body);
        onEvent?.(reply.kind, reply.body);
      }
    } finally {
      this._unregister(id);
    }
  }

  /** text's token ids in `model`'s vocabulary (default: the server's default model). */
  async tokenize(text, { model, ...options } = {}) {
    const body = model == null ? { text } : { text, model };
    return (await this.call('tokenize', body, options)).tokens;
  }

  /**
   * The embeddings of `input` (a string or an array of strings; SPEC.md 3.15): resolves to
   * the DONE body, `embeddings` one vector per input. Options: model, normalize (default
   * true), truncate (default false), encoding_format ('float' or 'base64').
   */
  async embed(input, { model, normalize, truncate, encoding_format, ...options } = {}) {
    const body = { input };
    if (model != null) body.model = model;
    if (normalize === false) body.normalize = false;
    if (truncate) body.truncate = true;
    if (encoding_format && encoding_format !== 'float') body.encoding_format = encoding_format;
    return this.call('embed', body, options);
  }

  /** Resolves to the pong; its `instance` (also kept in client.instance) tells a restart. */
  ping() {
    return this.call('ping');
  }

  status() {
    return this.call('status');
  }

  /** Ask the server to stop a request of this client; resolves to {found}. */
  cancel(requestId) {
    return this.call('cancel', { target: requestId });
  }

  close() {
    this.closed = true;
    for (const queue of this.pending.values()) queue.fail(new Error('client closed'));
    this.sock.close();
  }
}

module.exports = {
  Client,
  Completion,
  LlmsupError,
  TimeoutError,
  findEndpoint,
  readCurveKeys,
  VERSION,
  RECEIVE_TIMEOUT_MS,
};
