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
 * One Client is one DEALER connection; it may carry any number of concurrent requests.
 * Errors from the server are thrown as LlmsupError with `code`, `field`, `retryAfterMs`.
 */
const fs = require('node:fs');
const path = require('node:path');
const zmq = require('zeromq');

const VERSION = 'LLMSUP1';

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

class TimeoutError extends Error {
  constructor(message) {
    super(message);
    this.name = 'TimeoutError';
    this.code = 'timeout';
  }
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
  async next(timeoutMs, what) {
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
        throw new TimeoutError(`no reply to ${what} in ${timeoutMs} ms`);
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
 * Leaving the loop early (break) cancels the request on the server.
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
  }

  async *[Symbol.asyncIterator]() {
    const { signal, maxAttempts = 1, onRetry, timeoutMs = this.client.timeoutMs } = this.options;
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
          const { kind, body } = await queue.next(timeoutMs, id);
          if (kind === 'token') {
            this.tokens++;
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
          }
          // `queued`, or a kind added later: not terminal (SPEC.md section 4).
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

  /** The whole text. */
  async text() {
    let text = '';
    for await (const piece of this) text += piece;
    return text;
  }
}

class Client {
  /**
   * endpoint: ipc://... or tcp://...; default $LLMSUP_ENDPOINT, else the running
   * supervisor's (stateDir, else the default state dir). timeoutMs: the longest wait for
   * the next reply frame of a request.
   */
  constructor({ endpoint, stateDir, timeoutMs = 120000 } = {}) {
    this.endpoint = endpoint || process.env.LLMSUP_ENDPOINT || findEndpoint(stateDir);
    this.timeoutMs = timeoutMs;
    this.sock = new zmq.Dealer({ linger: 0 });
    this.sock.connect(this.endpoint);
    this.pending = new Map();
    this.prefix = `n${process.pid}-`;
    this.counter = 0;
    this.sending = Promise.resolve();
    this.closed = false;
    this.reader = this._read();
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
    const sent = this.sending.then(() => this.sock.send(frames));
    this.sending = sent.catch(() => {});
    return sent;
  }

  /** Stream a completion: `for await (const text of client.complete(prompt, params))`. */
  complete(prompt, params = {}, options = {}) {
    return new Completion(this, 'complete', { prompt, ...params }, options);
  }

  /** messages: [{role, content}, ...]. */
  chat(messages, params = {}, options = {}) {
    return new Completion(this, 'chat', { messages, ...params }, options);
  }

  /** A request whose only reply is its terminal frame; resolves to the DONE body. */
  async call(verb, body = {}, { timeoutMs = this.timeoutMs } = {}) {
    const id = this._newId();
    const queue = this._register(id);
    try {
      await this._send(verb, id, body);
      for (;;) {
        const reply = await queue.next(timeoutMs, id);
        if (reply.kind === 'done') return reply.body;
        if (reply.kind === 'error') throw new LlmsupError(reply.body);
      }
    } finally {
      this._unregister(id);
    }
  }

  async tokenize(text) {
    return (await this.call('tokenize', { text })).tokens;
  }

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

module.exports = { Client, Completion, LlmsupError, TimeoutError, findEndpoint, VERSION };
