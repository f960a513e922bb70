/**
 * taskcast.js: the dependency-free browser client of a taskcast gateway (an ES module).
 *
 *   import { watch } from '/taskcast.js';
 *   const handle = watch([1, 2], (task) => render(task), {
 *     token: () => fetch('/my-service/taskcast-token').then((r) => r.text()),  // or a string
 *     onStatus: (text) => log(text),
 *   });
 *   handle.close();   // stop early; it also stops by itself once every task has finished
 *
 * Transports, tried in this order unless `options.transport` forces one:
 *   'sse'  one multi-task stream `GET /events?task_id=1&task_id=2` (EventSource);
 *   'ws'   one WebSocket `/ws` with `{"op":"subscribe","task_ids":[...]}`;
 *   'poll' `GET /tasks/{id}` every `pollIntervalMs`, with ETag / If-None-Match (304 = unchanged).
 * A transport counts as blocked (a proxy that buffers streams, a firewall that drops upgrades)
 * when it errors, or stays silent for `firstEventTimeoutMs`, before its first message: the
 * server always sends each task's current state at once. A transport that has worked once is
 * never abandoned: after a later error it reconnects with capped exponential backoff + jitter.
 *
 * Access tokens (a gateway with a key configured reads no task without a JWT that names it):
 * `options.token` is the token, or a function (sync or async) that returns one. It goes into
 * the URL (`?token=`) of the SSE stream and the WebSocket, which cannot send headers, and into
 * `Authorization: Bearer` for polling. A function is called before the first connection and
 * again whenever the gateway refuses the token: 401 on a poll, 401 to the HEAD request that
 * asks why an EventSource failed before its first event, a WebSocket closed with 4401 or an
 * error frame 401, an SSE `token_expired` event (the token ran out mid-stream). The client then
 * reconnects the same transport at once with the new token (this is no transport failure and
 * never falls back); if that token is refused too, the next tries back off like failures do.
 * A refused string token (or none at all) cannot be renewed: `onStatus` says so and the watch
 * stops (`done` resolves). Tasks a valid token does not name (403) go to `onForbidden`, and
 * unknown ids (404) to `onNotFound`; both are dropped and the others watched on. Over SSE, a 403
 * or 404 fails the whole stream, so the client asks (HEAD, per task) which ids caused it.
 *
 * Every transport may repeat a state (e.g. after a reconnect); the client delivers only newer
 * versions per task, so `onUpdate` never sees an older or repeated version. A task is watched
 * until it is completed or failed; when all are, everything is closed.
 * Task ids are numbers up to Number.MAX_SAFE_INTEGER (they arrive as JSON numbers).
 */

const TERMINAL = new Set(['completed', 'failed']);
const ORDER = ['sse', 'ws', 'poll'];
const WS_UNAUTHORIZED = 4401;

/**
 * @typedef {object} Task  The task object, as in `GET /tasks/{id}`'s `data`.
 * @property {number} task_id
 * @property {'submitted'|'processing'|'completed'|'failed'} status
 * @property {number} progress        0..100
 * @property {{image_base64: string, image_url: string}} image
 * @property {string} error_message
 * @property {number} version         1 at creation, +1 per change
 * @property {number} updated_at      ms since the epoch
 *
 * @typedef {string | (() => string | Promise<string>)} TokenSource
 *   An access token (a JWT whose `tasks` claim names the watched tasks), or a function that
 *   returns a fresh one (possibly async). The function is called before the first connection
 *   and after each refusal (401, WebSocket close 4401, SSE `token_expired`); if it throws,
 *   rejects or returns no string, the client retries it with backoff.
 *
 * @typedef {object} WatchOptions
 * @property {string} [baseUrl='']            gateway URL; '' = same origin, or an absolute http(s) URL
 * @property {'sse'|'ws'|'poll'} [transport]  force one transport (default: sse, then ws, then poll)
 * @property {TokenSource} [token]            access token, or a function returning one; none
 *                                            for a gateway without access control
 * @property {boolean} [includeImageBase64=true]  false: `image_base64` arrives as ''
 * @property {number} [firstEventTimeoutMs=5000]  silence before a new transport counts as blocked
 * @property {number} [pollIntervalMs=1000]
 * @property {number} [minBackoffMs=500]      first reconnect delay
 * @property {number} [maxBackoffMs=15000]    reconnect delays double up to this cap
 * @property {(text: string) => void} [onStatus]  the transport in use and its state, as text
 *                                            (including token refreshes and refusals)
 * @property {(taskIds: number[]) => void} [onNotFound]  tasks the gateway does not know (dropped)
 * @property {(taskIds: number[]) => void} [onForbidden]  tasks the token does not name: a 403
 *                                            (dropped, like unknown ones)
 *
 * @typedef {object} WatchHandle
 * @property {() => void} close             stop watching, close every connection
 * @property {string} transport             the transport in use: 'sse', 'ws', 'poll' or ''
 * @property {Promise<void>} done           resolves when every task has finished or was
 *                                          dropped, when a token cannot be renewed, or on close
 */

/** A 401 (or its WebSocket equivalents): the token needs renewing. */
class Unauthorized extends Error {}

/**
 * Watch tasks until each is completed or failed.
 * @param {Array<number|string>} taskIds
 * @param {(task: Task) => void} onUpdate  called once per new version of a task
 * @param {WatchOptions} [options]
 * @returns {WatchHandle}
 */
export function watch(taskIds, onUpdate, options = {}) {
  const opts = {
    baseUrl: '', transport: undefined, token: undefined, includeImageBase64: true,
    firstEventTimeoutMs: 5000, pollIntervalMs: 1000, minBackoffMs: 500, maxBackoffMs: 15000,
    onStatus: () => {}, onNotFound: () => {}, onForbidden: () => {},
  };
  for (const [key, value] of Object.entries(options)) {
    if (value !== undefined) opts[key] = value; // undefined keeps the default
  }
  if (opts.transport && !ORDER.includes(opts.transport)) {
    throw new Error(`taskcast: unknown transport ${opts.transport}`);
  }
  if (opts.token !== undefined && opts.token !== null && typeof opts.token !== 'string'
      && typeof opts.token !== 'function') {
    throw new Error('taskcast: token must be a string or a function returning one');
  }
  const base = String(opts.baseUrl || '').replace(/\/+$/, '');
  const ids = [...new Set(taskIds.map((id) => String(id)))];
  const watched = new Set(ids);
  /** @type {Map<string, number>} the newest version delivered per task */
  const versions = new Map();
  const finished = new Set();
  const worked = new Set(); // transports that delivered at least once: never abandoned
  const renewable = typeof opts.token === 'function';
  /** The token in use: null = none yet (a function is asked before connecting). */
  let token = typeof opts.token === 'string' && opts.token ? opts.token : null;
  let tokenRequest = 0; // the number of the token function's latest call (older answers: stale)
  let refusedInARow = 0; // refusals since a connection last worked: > 1 means renewing did not help
  let chain = opts.transport ? [opts.transport] : ORDER.slice();
  let current = null; // {name, stop()} of the running transport
  let retryTimer = null;
  let attempt = 0;
  let closed = false;
  let resolveDone;
  const done = new Promise((resolve) => { resolveDone = resolve; });

  const pending = () => ids.filter((id) => !finished.has(id));
  const status = (text) => { try { opts.onStatus(text); } catch (err) { console.error(err); } };

  /** Deliver a task state if it is newer than what the caller already has. */
  function deliver(task) {
    const id = String(task && task.task_id);
    if (closed || !watched.has(id) || finished.has(id)) return;
    if (!(task.version > (versions.get(id) ?? 0))) return;
    versions.set(id, task.version);
    if (TERMINAL.has(task.status)) finished.add(id);
    try { onUpdate(task); } catch (err) { console.error('taskcast onUpdate:', err); }
    if (finished.size === ids.length) finish('all tasks finished');
  }

  /** Stop watching tasks the gateway will not show: unknown (404) or not in the token (403). */
  function drop(taskIds, callback, why) {
    const known = [...new Set(taskIds.map(String))]
      .filter((id) => watched.has(id) && !finished.has(id));
    if (!known.length) return false;
    known.forEach((id) => finished.add(id));
    status(`${why}: task${known.length > 1 ? 's' : ''} ${known.join(', ')}`);
    try { callback(known.map(Number)); } catch (err) { console.error(err); }
    if (finished.size === ids.length) finish('all tasks finished');
    return true;
  }
  const dropMissing = (missing) => drop(missing, opts.onNotFound, 'not found');
  const dropForbidden = (refused) => drop(refused, opts.onForbidden, 'forbidden by the token');

  function finish(text) {
    if (closed) return;
    closed = true;
    clearTimeout(retryTimer);
    if (current) current.stop();
    current = null;
    status(text);
    resolveDone();
  }

  /** Start the first transport of the chain, once there is a token (if there is a source). */
  function connect() {
    if (closed) return;
    current = null;
    if (renewable && token === null) {
      const ticket = ++tokenRequest;
      Promise.resolve().then(() => opts.token()).then((value) => {
        if (closed || ticket !== tokenRequest) return;
        if (typeof value !== 'string' || !value) throw new Error('no token returned');
        token = value;
        open();
      }).catch((err) => {
        if (closed || ticket !== tokenRequest) return;
        retry(`the token function failed (${err && err.message ? err.message : err})`);
      });
      return;
    }
    open();
  }

  function open() {
    const name = chain[0];
    const transport = { sse: openSse, ws: openWs, poll: startPolling }[name];
    current = { name, stop: () => {} };
    current.stop = transport(current);
  }

  /** Connect again after the next backoff delay (capped exponential, "equal jitter"). */
  function retry(what) {
    const cap = Math.min(opts.maxBackoffMs, opts.minBackoffMs * 2 ** attempt);
    const delay = Math.round(cap / 2 + Math.random() * cap / 2);
    attempt += 1;
    status(`${what}; reconnecting in ${(delay / 1000).toFixed(1)} s`);
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, delay);
  }

  /**
   * A transport stopped. Before its first message (and with another one left) it is blocked:
   * move on to the next; otherwise reconnect it after a backoff.
   */
  function failed(run, why) {
    if (closed || current !== run) return;
    run.stop();
    if (!worked.has(run.name) && chain.length > 1) {
      status(`${label(run.name)} unavailable (${why}); falling back`);
      chain = chain.slice(1);
      connect();
      return;
    }
    retry(`${label(run.name)}: ${why}`);
  }

  /**
   * The gateway refused the token (401, close 4401, `token_expired`). A token function is
   * asked for a new one and the same transport reconnects at once; if the previous renewal
   * did not help either, after a backoff. A fixed token (or none) ends the watch.
   */
  function unauthorized(run, why) {
    if (closed || current !== run) return;
    run.stop();
    const name = label(run.name);
    if (!renewable) {
      finish(`${name}: unauthorized (${why}); ${token === null
        ? 'this gateway needs an access token (the token option)'
        : 'the token was refused and cannot be renewed'}`);
      return;
    }
    token = null;
    refusedInARow += 1;
    if (refusedInARow > 1) {
      retry(`${name}: unauthorized (${why}) again after a token refresh`);
      return;
    }
    status(`${name}: ${why}; refreshing the token`);
    connect();
  }

  /** A message arrived on this connection: the transport works, the backoff starts over. */
  function working(run) {
    if (run.live) return;
    run.live = true;
    worked.add(run.name);
    attempt = 0;
    refusedInARow = 0;
    clearTimeout(run.firstTimer);
    status(`${label(run.name)}: live`);
  }

  /** Bound the wait for a new connection's first message. */
  function expectFirstMessage(run, what) {
    run.firstTimer = setTimeout(() => failed(run, `no ${what} in ${opts.firstEventTimeoutMs} ms`),
      opts.firstEventTimeoutMs);
  }

  const flag = opts.includeImageBase64 ? '' : 'image_base64=false';
  /** The query string of an SSE or WebSocket URL: `parts`, the image flag and the token. */
  function query(parts) {
    const all = parts.slice();
    if (flag) all.push(flag);
    if (token !== null) all.push(`token=${encodeURIComponent(token)}`);
    return all.length ? `?${all.join('&')}` : '';
  }
  const sseUrl = (taskIdList) => `${base}/events${query(
    taskIdList.map((id) => `task_id=${encodeURIComponent(id)}`))}`;

  /** SSE: one stream for all unfinished tasks. Our own backoff replaces EventSource's retry. */
  function openSse(run) {
    const source = new EventSource(sseUrl(pending()));
    status('SSE: connecting');
    expectFirstMessage(run, 'event');
    source.onmessage = (event) => {
      working(run);
      deliver(JSON.parse(event.data));
    };
    source.addEventListener('not_found', (event) => {
      dropMissing(String(event.data).split(','));
      failed(run, 'task not found');
    });
    source.addEventListener('token_expired', () => unauthorized(run, 'token expired'));
    // After `end` every task is finished, and so are we; otherwise start a fresh stream.
    source.addEventListener('end', () => failed(run, 'stream ended'));
    source.onerror = () => {
      if (run.live) { failed(run, 'connection lost'); return; }
      // EventSource hides the status of a refused stream: ask the gateway with a HEAD.
      source.close();
      clearTimeout(run.firstTimer);
      probeSse(run);
    };
    return () => { clearTimeout(run.firstTimer); source.close(); };
  }

  /** The status of the SSE request for these ids, without opening a stream; 0 when unreachable. */
  async function sseStatus(taskIdList) {
    try {
      const response = await fetch(sseUrl(taskIdList), { method: 'HEAD', cache: 'no-store' });
      return response.status;
    } catch {
      return 0; // unreachable, or refused by CORS
    }
  }

  /** Why did the stream fail before its first event? 401: renew the token; 403 and 404: find
   *  the ids that caused it, drop them and reconnect at once; anything else is a failure. */
  async function probeSse(run) {
    const asked = pending();
    let code = await sseStatus(asked);
    if (closed || current !== run) return;
    if (code === 403 || code === 404) {
      const codes = await Promise.all(asked.map((id) => sseStatus([id])));
      if (closed || current !== run) return;
      if (codes.includes(401)) {
        code = 401;
      } else {
        const refused = asked.filter((id, index) => codes[index] === 403);
        const missing = asked.filter((id, index) => codes[index] === 404);
        const dropped = [dropForbidden(refused), dropMissing(missing)].some(Boolean);
        if (dropped) {
          if (!closed) { run.stop(); connect(); } // the other tasks, at once
          return;
        }
      }
    }
    if (code === 401) unauthorized(run, 'HTTP 401');
    else failed(run, code ? `connection lost (HTTP ${code})` : 'connection lost');
  }

  /** WebSocket: one socket, one subscribe frame for all unfinished tasks. */
  function openWs(run) {
    const url = new URL(`${base}/ws${query([])}`, location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    let socket;
    try {
      socket = new WebSocket(url.href);
    } catch (err) {
      setTimeout(() => failed(run, String(err)), 0);
      return () => {};
    }
    status('WebSocket: connecting');
    expectFirstMessage(run, 'frame');
    socket.onopen = () => socket.send(JSON.stringify({ op: 'subscribe', task_ids: pending() }));
    socket.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === 'error' && frame.code === 401) {
        unauthorized(run, 'error frame 401');
        return;
      }
      working(run);
      if (frame.type === 'task') deliver(frame.data);
      else if (frame.type === 'error' && frame.code === 404) dropMissing(frame.task_ids || []);
      else if (frame.type === 'error' && frame.code === 403) dropForbidden(frame.task_ids || []);
      else if (frame.type === 'error') console.warn('taskcast:', frame);
    };
    socket.onclose = (event) => {
      if (event.code === WS_UNAUTHORIZED) unauthorized(run, 'closed (4401)');
      else failed(run, `closed (${event.code})`);
    };
    return () => {
      clearTimeout(run.firstTimer);
      socket.onclose = socket.onmessage = socket.onopen = null;
      if (socket.readyState <= WebSocket.OPEN) socket.close(1000);
    };
  }

  /** REST polling with ETag / If-None-Match: an unchanged task costs a body-less 304. */
  function startPolling(run) {
    const etags = new Map();
    const bearer = token;
    let timer = null;
    let stopped = false;
    status(`polling every ${opts.pollIntervalMs} ms`);

    async function pollOne(id) {
      const headers = etags.has(id) ? { 'If-None-Match': etags.get(id) } : {};
      if (bearer !== null) headers.Authorization = `Bearer ${bearer}`;
      const response = await fetch(`${base}/tasks/${encodeURIComponent(id)}${flag ? `?${flag}` : ''}`,
        { headers, cache: 'no-store' });
      if (stopped || response.status === 304) return;
      if (response.status === 401) throw new Unauthorized('HTTP 401');
      if (response.status === 403) { dropForbidden([id]); return; }
      if (response.status === 404) { dropMissing([id]); return; }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const body = await response.json();
      if (stopped) return;
      if (response.headers.get('ETag')) etags.set(id, response.headers.get('ETag'));
      deliver(body.data);
    }

    async function round() {
      try {
        await Promise.all(pending().map(pollOne));
        if (stopped) return;
        working(run);
        timer = setTimeout(round, opts.pollIntervalMs);
      } catch (err) {
        if (stopped) return;
        if (err instanceof Unauthorized) unauthorized(run, err.message);
        else failed(run, err.message || 'request failed');
      }
    }
    round();
    return () => { stopped = true; clearTimeout(timer); };
  }

  if (ids.length === 0) {
    finish('nothing to watch');
  } else {
    connect();
  }
  return {
    close: () => finish('closed'),
    get transport() { return closed || !current ? '' : current.name; },
    done,
  };
}

/** @param {string} name */
function label(name) {
  return { sse: 'SSE', ws: 'WebSocket', poll: 'REST polling' }[name] || name;
}
