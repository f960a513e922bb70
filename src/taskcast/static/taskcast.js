/**
 * taskcast.js: the dependency-free browser client of a taskcast gateway (an ES module).
 *
 *   import { watch } from '/taskcast.js';
 *   const handle = watch([1, 2], (task) => render(task), { onStatus: (text) => log(text) });
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
 * Every transport may repeat a state (e.g. after a reconnect); the client delivers only newer
 * versions per task, so `onUpdate` never sees an older or repeated version. A task is watched
 * until it is completed or failed; when all are, everything is closed.
 * Task ids are numbers up to Number.MAX_SAFE_INTEGER (they arrive as JSON numbers). Unknown
 * ids are reported to `onNotFound` and dropped (over SSE, an unknown id makes the whole stream
 * a 404, which EventSource cannot tell from other errors: in the default chain the WebSocket
 * then names the unknown ids; with `transport: 'sse'` forced the client keeps retrying).
 */

const TERMINAL = new Set(['completed', 'failed']);
const ORDER = ['sse', 'ws', 'poll'];

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
 * @typedef {object} WatchOptions
 * @property {string} [baseUrl='']            gateway URL; '' = same origin, or an absolute http(s) URL
 * @property {'sse'|'ws'|'poll'} [transport]  force one transport (default: sse, then ws, then poll)
 * @property {boolean} [includeImageBase64=true]  false: `image_base64` arrives as ''
 * @property {number} [firstEventTimeoutMs=5000]  silence before a new transport counts as blocked
 * @property {number} [pollIntervalMs=1000]
 * @property {number} [minBackoffMs=500]      first reconnect delay
 * @property {number} [maxBackoffMs=15000]    reconnect delays double up to this cap
 * @property {(text: string) => void} [onStatus]  the transport in use and its state, as text
 * @property {(taskIds: number[]) => void} [onNotFound]  tasks the gateway does not know (dropped)
 *
 * @typedef {object} WatchHandle
 * @property {() => void} close             stop watching, close every connection
 * @property {string} transport             the transport in use: 'sse', 'ws', 'poll' or ''
 * @property {Promise<void>} done           resolves when every task has finished (or on close)
 */

/**
 * Watch tasks until each is completed or failed.
 * @param {Array<number|string>} taskIds
 * @param {(task: Task) => void} onUpdate  called once per new version of a task
 * @param {WatchOptions} [options]
 * @returns {WatchHandle}
 */
export function watch(taskIds, onUpdate, options = {}) {
  const opts = {
    baseUrl: '', transport: undefined, includeImageBase64: true, firstEventTimeoutMs: 5000,
    pollIntervalMs: 1000, minBackoffMs: 500, maxBackoffMs: 15000,
    onStatus: () => {}, onNotFound: () => {},
  };
  for (const [key, value] of Object.entries(options)) {
    if (value !== undefined) opts[key] = value; // undefined keeps the default
  }
  if (opts.transport && !ORDER.includes(opts.transport)) {
    throw new Error(`taskcast: unknown transport ${opts.transport}`);
  }
  const base = String(opts.baseUrl || '').replace(/\/+$/, '');
  const ids = [...new Set(taskIds.map((id) => String(id)))];
  const watched = new Set(ids);
  /** @type {Map<string, number>} the newest version delivered per task */
  const versions = new Map();
  const finished = new Set();
  const worked = new Set(); // transports that delivered at least once: never abandoned
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

  function dropMissing(missing) {
    const known = missing.map(String).filter((id) => watched.has(id) && !finished.has(id));
    if (!known.length) return;
    known.forEach((id) => finished.add(id));
    try { opts.onNotFound(known.map(Number)); } catch (err) { console.error(err); }
    if (finished.size === ids.length) finish('all tasks finished');
  }

  function finish(text) {
    if (closed) return;
    closed = true;
    clearTimeout(retryTimer);
    if (current) current.stop();
    current = null;
    status(text);
    resolveDone();
  }

  /** Start the first transport of the chain. */
  function connect() {
    if (closed) return;
    const name = chain[0];
    const transport = { sse: openSse, ws: openWs, poll: startPolling }[name];
    current = { name, stop: () => {} };
    current.stop = transport(current);
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
    const cap = Math.min(opts.maxBackoffMs, opts.minBackoffMs * 2 ** attempt);
    const delay = Math.round(cap / 2 + Math.random() * cap / 2); // "equal jitter"
    attempt += 1;
    status(`${label(run.name)}: ${why}; reconnecting in ${(delay / 1000).toFixed(1)} s`);
    retryTimer = setTimeout(connect, delay);
  }

  /** A message arrived on this connection: the transport works, the backoff starts over. */
  function working(run) {
    if (run.live) return;
    run.live = true;
    worked.add(run.name);
    attempt = 0;
    clearTimeout(run.firstTimer);
    status(`${label(run.name)}: live`);
  }

  /** Bound the wait for a new connection's first message. */
  function expectFirstMessage(run, what) {
    run.firstTimer = setTimeout(() => failed(run, `no ${what} in ${opts.firstEventTimeoutMs} ms`),
      opts.firstEventTimeoutMs);
  }

  const flag = opts.includeImageBase64 ? '' : 'image_base64=false';

  /** SSE: one stream for all unfinished tasks. Our own backoff replaces EventSource's retry. */
  function openSse(run) {
    const query = pending().map((id) => `task_id=${encodeURIComponent(id)}`);
    if (flag) query.push(flag);
    const source = new EventSource(`${base}/events?${query.join('&')}`);
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
    // After `end` every task is finished, and so are we; otherwise start a fresh stream.
    source.addEventListener('end', () => failed(run, 'stream ended'));
    source.onerror = () => failed(run, 'connection lost');
    return () => { clearTimeout(run.firstTimer); source.close(); };
  }

  /** WebSocket: one socket, one subscribe frame for all unfinished tasks. */
  function openWs(run) {
    const url = new URL(`${base}/ws${flag ? `?${flag}` : ''}`, location.href);
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
      working(run);
      const frame = JSON.parse(event.data);
      if (frame.type === 'task') deliver(frame.data);
      else if (frame.type === 'error' && frame.code === 404) dropMissing(frame.task_ids || []);
      else if (frame.type === 'error') console.warn('taskcast:', frame);
    };
    socket.onclose = (event) => failed(run, `closed (${event.code})`);
    return () => {
      clearTimeout(run.firstTimer);
      socket.onclose = socket.onmessage = socket.onopen = null;
      if (socket.readyState <= WebSocket.OPEN) socket.close(1000);
    };
  }

  /** REST polling with ETag / If-None-Match: an unchanged task costs a body-less 304. */
  function startPolling(run) {
    const etags = new Map();
    let timer = null;
    let stopped = false;
    status(`polling every ${opts.pollIntervalMs} ms`);

    async function pollOne(id) {
      const headers = etags.has(id) ? { 'If-None-Match': etags.get(id) } : {};
      const response = await fetch(`${base}/tasks/${encodeURIComponent(id)}${flag ? `?${flag}` : ''}`,
        { headers, cache: 'no-store' });
      if (response.status === 304) return;
      if (response.status === 404) { dropMissing([id]); return; }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const body = await response.json();
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
        if (!stopped) failed(run, err.message || 'request failed');
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
