// Receive taskcast's webhooks in Node (20+) with the `standardwebhooks` package: verify each
// one, drop repeats, keep each task's newest state. The same receiver as webhook_receiver.py:
//
//   npm install standardwebhooks@1
//   TASKCAST_WEBHOOK_SECRET=whsec_... node webhook_receiver.mjs --port 9001
//
// then create tasks whose webhook_url is http://<this host>:9001/webhooks. The secret is the
// gateway's TASKCAST_WEBHOOK_SECRET (a comma-separated list, as during a rotation, works too).
//
// Each POST /webhooks: (1) the signature is verified over the raw body bytes, 401 when it does
// not verify (the body is never parsed); (2) a webhook-id accepted before is a repeat (delivery
// is at least once), 204; (3) a task this service no longer wants (here: --cancelled TASK_ID)
// gets 410, and taskcast sends no more messages for it; (4) a version older than the newest
// one accepted for the task is ignored, 204; (5) the message is answered 204 at once and then
// handled in order: one line per message,
// `task.progress task_id=42 status=processing progress=40 version=3`.
// Everything is in memory here; a real service keeps the webhook-ids and versions with its
// jobs, in its database, and writes them before answering.
import http from 'node:http';
import { parseArgs } from 'node:util';
import { Webhook } from 'standardwebhooks';

const MAX_BODY_BYTES = 20 * 1024 * 1024; // a completed task carries its image: <= 16 MiB base64
const REMEMBERED = 100_000; // webhook-ids and task versions kept (the oldest are forgotten)

const { values: args } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: process.env.PORT ?? '9001' },
    cancelled: { type: 'string', multiple: true, default: [] }, // task ids answered 410
  },
});
const secrets = (process.env.TASKCAST_WEBHOOK_SECRET ?? '').split(',')
  .map((secret) => secret.trim()).filter(Boolean);
if (secrets.length === 0) {
  console.error("set TASKCAST_WEBHOOK_SECRET to the gateway's whsec_... secret");
  process.exit(2);
}
let verifiers;
try {
  // The whole string, whsec_ included: the library strips the prefix and decodes the base64.
  if (!secrets.every((secret) => secret.startsWith('whsec_'))) throw new Error();
  verifiers = secrets.map((secret) => new Webhook(secret));
} catch {
  console.error('TASKCAST_WEBHOOK_SECRET is not a whsec_<base64> secret'); // never the secret
  process.exit(2);
}
const cancelled = new Set(args.cancelled);
const seenIds = new Map(); // accepted webhook-ids, oldest first
const newest = new Map(); // task_id (a string) -> newest version accepted

function remember(memory, key, value) {
  memory.delete(key);
  memory.set(key, value);
  if (memory.size > REMEMBERED) memory.delete(memory.keys().next().value);
}

// True if the body's signature verifies with one of the secrets. Node's header names are
// lowercase already, which is what the library looks up.
function verified(body, headers) {
  return verifiers.some((verifier) => {
    try {
      verifier.verify(body, headers);
      return true;
    } catch {
      return false;
    }
  });
}

// Task ids are 64-bit integers: JSON.parse would round those above 2^53, so task_id is read
// as a string. (Only a key can match: a quote inside a JSON string is always escaped.)
function parse(body) {
  return JSON.parse(body.toString('utf8').replace(/"task_id"\s*:\s*(\d+)/, '"task_id":"$1"'));
}

let work = Promise.resolve(); // accepted messages are handled one at a time, in order
function handle(message) {
  const task = message.data;
  console.log(`${message.type} task_id=${task.task_id} status=${task.status}` +
    ` progress=${task.progress} version=${task.version}`);
}

async function receive(req, res) {
  if (Number(req.headers['content-length'] ?? 0) > MAX_BODY_BYTES) {
    return res.writeHead(413, { connection: 'close' }).end(); // the body is not read
  }
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) return req.destroy(); // too large without a length: hang up
    chunks.push(chunk);
  }
  const body = Buffer.concat(chunks);
  if (!verified(body, req.headers)) {
    console.error('401 rejected: the signature does not verify');
    return res.writeHead(401).end();
  }
  // Verified: from here on the message is taskcast's. (No await below: one at a time.)
  const webhookId = req.headers['webhook-id'];
  if (seenIds.has(webhookId)) {
    console.error(`204 duplicate webhook-id ${webhookId}`);
    return res.writeHead(204).end();
  }
  const message = parse(body);
  const task = message.data;
  if (!String(message.type).startsWith('task.') || !task || typeof task !== 'object') {
    return res.writeHead(204).end(); // a kind of message this receiver does not use
  }
  if (cancelled.has(task.task_id)) {
    console.error(`410 cancelled: task_id=${task.task_id}`);
    return res.writeHead(410).end();
  }
  if (task.version <= (newest.get(task.task_id) ?? 0)) {
    console.error(`204 older: task_id=${task.task_id} version=${task.version}` +
      ` <= ${newest.get(task.task_id)}`);
    return res.writeHead(204).end();
  }
  remember(seenIds, webhookId, true);
  remember(newest, task.task_id, task.version);
  res.writeHead(204).end(); // answer at once, then do the work
  work = work.then(() => handle(message)).catch((error) => console.error(error));
}

const server = http.createServer((req, res) => {
  if (req.url !== '/webhooks') return res.writeHead(404).end();
  if (req.method !== 'POST') return res.writeHead(405, { allow: 'POST' }).end();
  receive(req, res).catch((error) => {
    console.error(error);
    if (!res.headersSent) res.writeHead(500).end();
  });
});
server.listen(Number(args.port), args.host, () => {
  console.error(`listening on http://${args.host}:${args.port}/webhooks`);
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => server.close(() => work.then(() => process.exit(0))));
}
