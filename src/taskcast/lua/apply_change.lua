-- taskcast: apply one change to a task record and publish the new state, atomically.
--
-- This file is the producer contract (README, "Redis contract"). Producers in any language
-- may EVAL/EVALSHA it exactly as shipped:
--
--   EVALSHA <sha1> 2 P:task:{ID} P:task:{ID}:events <change-json>
--
-- or, for a completion whose image was uploaded first (see "Staged images" below):
--
--   EVALSHA <sha1> 4 P:task:{ID} P:task:{ID}:events P:task:{ID}:upload:<token> P:task:{ID}:image
--       <change-json>
--
-- <change-json> is a JSON object:
--   op             "create" | "update" | "timeout"                       (required)
--   task_id        decimal string (or a JSON integer below 2^53)        (required)
--   status         "submitted" | "processing" | "completed" | "failed"
--   progress       integer 0..100
--   type, angle    strings of at most 256 bytes, only with op=create
--   image_url      at most 8192 bytes: "", an absolute http:// or https:// URL, or a path
--                  starting with "/"; only when the new status is "completed"
--   image_base64   at most 16 MiB of valid base64, only when the new status is "completed"
--                  (costly for Redis above ~64 KiB: it passes through Lua; stage it instead)
--   image_bytes    length of a staged raw image (1..12582912 bytes; KEYS[3] holds it)
--   error_message  string, only when the new status is "failed"; cut to 4096 bytes
--   timeout_s      1..604800 (default 3600, kept on the record): an unfinished task with no
--                  accepted change for that long is failed by the gateway (op "timeout")
--   retention_s    seconds a finished record is kept (default 86400; 0 = forever)
--   webhook_url    op=create only: an absolute http:// or https:// URL of at most 8192 bytes;
--                  the gateway POSTs the task's states there (README, "Webhooks")
--   webhook_events op=create only, with webhook_url: a JSON array, a non-empty subset of
--                  "start" "progress" "completed" "failed" (default ["completed","failed"])
--   create_token   op=create only: up to 64 of [A-Za-z0-9_-]; a create repeated with the token
--                  the record was created with returns that record instead of EXISTS
--   publish        "PUBLISH" (default) or "SPUBLISH" (Redis Cluster sharded pub/sub)
--
-- Webhooks. A task created with webhook_url keeps it (and webhook_events) on its record; every
-- accepted change of such a task also PUBLISHes its id on P:webhooks (plain PUBLISH: channels
-- are not keys, so this works from any slot of a cluster), which wakes the delivering gateway,
-- and the first change to processing sets started_version. Producers also index the task in
-- P:webhooks:{ID mod 16} before and after the create (README); that index, not the wake,
-- is what makes delivery survive lost messages and restarts.
--
-- Staged images. An image of more than a few KiB is cheaper uploaded than sent in the change:
-- every byte passed to Lua costs Redis about 1.5 ms per MiB, and in JSON far more. The producer
-- SETs the raw image bytes (not base64) to P:task:{ID}:upload:<token> with a short PX, then sends
-- the completion with "image_bytes": <length> and the 4 keys above. The script checks the
-- length and RENAMEs the upload to P:task:{ID}:image; the record then has image_base64 "" and
-- image_bytes <length>, and readers take the image from that key (the gateway base64-encodes
-- it). The bytes never enter Lua, so a 4 MiB completion costs Redis well under 2 ms.
--
-- Events leave out images over 64 KiB (and staged ones): such an event has "image_base64"
-- "" and "image_base64_omitted": true, and readers take the image from the record. The reply
-- of the script is that same JSON.
--
-- On success the script returns the task object (JSON) after the change; when the change alters
-- anything it bumps version, sets updated_at, writes the record and publishes that same JSON.
-- A change that alters nothing returns the current state and writes nothing (safe retries),
-- also on a finished task (a worker repeating its completion gets the state, not TERMINAL).
-- A rejected change writes and publishes nothing and returns an error reply
-- "REJECTED <REASON> <message>"; REASON is one of
--   BAD_REQUEST BAD_STATUS BAD_TRANSITION BAD_PROGRESS PROGRESS_DECREASE BAD_FIELD TOO_LARGE
--   EXISTS NOT_FOUND TERMINAL CORRUPT
--
-- op "timeout" (sent by gateways) fails the task if it is unfinished and its deadline has
-- passed, and returns the failed task; otherwise it writes nothing and returns the plain string
-- "DUE <deadline_ms>" (not yet), "FINISHED" or "GONE" (no record).

local unpack = unpack or table.unpack  -- Lua 5.1 in Redis; 5.4 in some embedded runtimes

local function reject(reason, message)
  return redis.error_reply('REJECTED ' .. reason .. ' ' .. message)
end

local ok, change = pcall(cjson.decode, ARGV[1] or '')
if not ok or type(change) ~= 'table' then
  return reject('BAD_REQUEST', 'the change must be a JSON object')
end

local ALLOWED = {
  op = true, task_id = true, status = true, progress = true, type = true, angle = true,
  image_url = true, image_base64 = true, image_bytes = true, error_message = true,
  timeout_s = true, retention_s = true, create_token = true, publish = true,
  webhook_url = true, webhook_events = true,
}
for key, _ in pairs(change) do
  if not ALLOWED[key] then
    return reject('BAD_REQUEST', 'unknown field ' .. tostring(key))
  end
end

-- Ids are carried as decimal strings: Lua numbers are doubles and lose int64 precision.
local id = change.task_id
if type(id) == 'number' and id >= 0 and id < 9007199254740992 and math.floor(id) == id then
  id = string.format('%d', id)
end
if type(id) ~= 'string' or #id > 64 or not string.match(id, '^%d+$') then
  return reject('BAD_REQUEST', 'task_id must be a non-negative int64')
end
id = string.gsub(id, '^0+(%d)', '%1')
if #id > 19 or (#id == 19 and id > '9223372036854775807') then
  return reject('BAD_REQUEST', 'task_id must be a non-negative int64')
end
local record_key, channel_key = KEYS[1], KEYS[2]
if record_key == nil or string.sub(record_key, -(#id + 2)) ~= '{' .. id .. '}'
    or channel_key ~= record_key .. ':events' then
  return reject('BAD_REQUEST', 'keys must be P:task:{' .. id .. '} and P:task:{' .. id .. '}:events')
end
-- The wake channel of webhooks, P:webhooks, from a record key P:task:{ID} (nil otherwise).
local webhook_channel = nil
local task_tail = ':task:{' .. id .. '}'
if string.sub(record_key, -#task_tail) == task_tail then
  webhook_channel = string.sub(record_key, 1, #record_key - #task_tail) .. ':webhooks'
end
local upload_key, image_key = KEYS[3], KEYS[4]
if upload_key ~= nil then
  local token = string.sub(upload_key, #record_key + 9)
  if string.sub(upload_key, 1, #record_key + 8) ~= record_key .. ':upload:'
      or #token < 1 or #token > 64 or string.find(token, '[^%w_-]')
      or image_key ~= record_key .. ':image' or KEYS[5] ~= nil then
    return reject('BAD_REQUEST', 'keys 3 and 4 must be P:task:{' .. id .. '}:upload:<token> and P:task:{'
      .. id .. '}:image')
  end
end

local publish = change.publish or 'PUBLISH'
if publish ~= 'PUBLISH' and publish ~= 'SPUBLISH' then
  return reject('BAD_REQUEST', 'publish must be PUBLISH or SPUBLISH')
end

local function whole(value, low, high)
  return type(value) == 'number' and value >= low and value <= high and math.floor(value) == value
end

-- Checked before anything is written: an EXPIRE that fails after the HSET would leave the
-- record changed and unpublished (Redis does not roll back a script's writes).
local MAX_RETENTION = 3153600000  -- 100 years
local retention = change.retention_s
if retention ~= nil and not whole(retention, 0, MAX_RETENTION) then
  return reject('BAD_REQUEST', 'retention_s must be an integer from 0 to 3153600000')
end
local MAX_TIMEOUT, DEFAULT_TIMEOUT = 604800, 3600
if change.timeout_s ~= nil and not whole(change.timeout_s, 1, MAX_TIMEOUT) then
  return reject('BAD_REQUEST', 'timeout_s must be an integer from 1 to 604800')
end
-- An unfinished record outlives its deadline by this much at most, even if no gateway ever
-- fails it: abandoned records do not live forever.
local BACKSTOP_S = 86400

for _, name in ipairs({'status', 'type', 'angle', 'image_url', 'image_base64', 'error_message',
                       'create_token', 'webhook_url'}) do
  if change[name] ~= nil and type(change[name]) ~= 'string' then
    return reject('BAD_REQUEST', name .. ' must be a string')
  end
end

-- Field caps (contract section 8). Sizes are bytes.
local MAX_LABEL, MAX_URL = 256, 8192
local MAX_BASE64 = 16777216
local MAX_IMAGE_BYTES = 12582912  -- what 16 MiB of base64 encodes
local MAX_ERROR = 4096
local INLINE_EVENT_IMAGE = 65536  -- larger images are left out of events
for _, name in ipairs({'type', 'angle'}) do
  if change[name] ~= nil and #change[name] > MAX_LABEL then
    return reject('TOO_LARGE', name .. ' is longer than 256 bytes')
  end
end
local url = change.image_url
if url ~= nil then
  if #url > MAX_URL then
    return reject('TOO_LARGE', 'image_url is longer than 8192 bytes')
  end
  local absolute = string.match(url, '^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]') ~= nil
  if url ~= '' and not absolute and string.sub(url, 1, 1) ~= '/' then
    return reject('BAD_FIELD', 'image_url must be empty, an absolute http(s) URL or a path starting with /')
  end
  if string.find(url, '[%z\1-\31\127]') then
    return reject('BAD_FIELD', 'image_url must not contain control characters')
  end
end
local inline = change.image_base64
if inline ~= nil then
  if #inline > MAX_BASE64 then
    return reject('TOO_LARGE', 'image_base64 is larger than 16 MiB')
  end
  -- Anchored, one pass; the end position of the base64 alphabet run, then at most '=='.
  local stop = string.match(inline, '^[A-Za-z0-9+/]*()')
  local tail = string.sub(inline, stop)
  if #inline % 4 ~= 0 or (tail ~= '' and tail ~= '=' and tail ~= '==') then
    return reject('BAD_FIELD', 'image_base64 is not valid base64')
  end
end
local staged = change.image_bytes
if staged ~= nil then
  if not whole(staged, 1, math.huge) then
    return reject('BAD_FIELD', 'image_bytes must be a positive integer')
  end
  if staged > MAX_IMAGE_BYTES then
    return reject('TOO_LARGE', 'image_bytes is larger than 12582912 (16 MiB of base64)')
  end
  if upload_key == nil then
    return reject('BAD_REQUEST', 'image_bytes needs the upload and image keys (KEYS[3], KEYS[4])')
  end
  if inline ~= nil then
    return reject('BAD_FIELD', 'send image_base64 or image_bytes, not both')
  end
elseif upload_key ~= nil then
  return reject('BAD_REQUEST', 'KEYS[3] and KEYS[4] come only with image_bytes')
end
local webhook_url = change.webhook_url
if webhook_url ~= nil then
  if #webhook_url > MAX_URL then
    return reject('TOO_LARGE', 'webhook_url is longer than 8192 bytes')
  end
  if string.match(webhook_url, '^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]') == nil then
    return reject('BAD_FIELD', 'webhook_url must be an absolute http(s) URL')
  end
  if string.find(webhook_url, '[%z\1-\32\127]') then
    return reject('BAD_FIELD', 'webhook_url must not contain spaces or control characters')
  end
end
-- Kept on the record as a comma-separated list in this order, whatever order was sent.
local WEBHOOK_EVENTS = { 'start', 'progress', 'completed', 'failed' }
local webhook_events = nil
if change.webhook_events ~= nil then
  local wanted = change.webhook_events
  local named = {}
  if type(wanted) ~= 'table' then
    return reject('BAD_FIELD', 'webhook_events must be an array of event names')
  end
  for key, name in pairs(wanted) do
    if type(key) ~= 'number' or type(name) ~= 'string' then
      return reject('BAD_FIELD', 'webhook_events must be an array of event names')
    end
    named[name] = true
  end
  local list = {}
  for _, name in ipairs(WEBHOOK_EVENTS) do
    if named[name] then
      list[#list + 1] = name
      named[name] = nil
    end
  end
  if next(named) ~= nil then
    return reject('BAD_FIELD', 'webhook_events may name only start, progress, completed, failed')
  end
  if #list == 0 then
    return reject('BAD_FIELD', 'webhook_events must name at least one event')
  end
  webhook_events = table.concat(list, ',')
  if webhook_url == nil then
    return reject('BAD_FIELD', 'webhook_events comes only with webhook_url')
  end
end
local create_token = change.create_token
if create_token ~= nil and (#create_token < 1 or #create_token > 64
    or string.find(create_token, '[^%w_-]')) then
  return reject('BAD_REQUEST', 'create_token must be 1 to 64 of A-Z a-z 0-9 _ -')
end

-- error_message is cut, never refused: a failure can always be recorded. The cut backs off
-- to the start of a UTF-8 character (continuation bytes are 0x80-0xBF).
local function cut(message)
  if message == nil or #message <= MAX_ERROR then
    return message
  end
  local stop = MAX_ERROR
  while stop > 0 do
    local next_byte = string.byte(message, stop + 1)
    if next_byte < 128 or next_byte >= 192 then
      break
    end
    stop = stop - 1
  end
  return string.sub(message, 1, stop)
end
local error_message = cut(change.error_message)

local KNOWN = { submitted = true, processing = true, completed = true, failed = true }
local TERMINAL = { completed = true, failed = true }
local NEXT = {
  submitted = { submitted = true, processing = true, completed = true, failed = true },
  processing = { processing = true, completed = true, failed = true },
}

local FIELDS = {
  'task_id', 'status', 'progress', 'type', 'angle', 'image_url', 'image_base64',
  'error_message', 'version', 'created_at', 'updated_at', 'image_bytes', 'timeout_s',
  'deadline_ms', 'retention_s', 'create_token', 'webhook_url', 'started_version',
}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function encode(task)
  local s = cjson.encode
  local image, omitted = task.image_base64, task.image_bytes > 0
  if #image > INLINE_EVENT_IMAGE then
    image, omitted = '', true
  end
  return '{"task_id":' .. id
    .. ',"status":' .. s(task.status)
    .. ',"progress":' .. string.format('%d', task.progress)
    .. ',"type":' .. s(task.type)
    .. ',"angle":' .. s(task.angle)
    .. ',"image":{"image_base64":' .. s(image)
    .. ',"image_url":' .. s(task.image_url) .. '}'
    .. ',"error_message":' .. s(task.error_message)
    .. ',"version":' .. string.format('%d', task.version)
    .. ',"updated_at":' .. string.format('%d', task.updated_at)
    .. (omitted and ',"image_base64_omitted":true}' or '}')
end

local function write_and_publish(task)
  redis.call('HSET', record_key,
    'task_id', id, 'status', task.status, 'progress', string.format('%d', task.progress),
    'type', task.type, 'angle', task.angle, 'image_url', task.image_url,
    'image_base64', task.image_base64, 'error_message', task.error_message,
    'version', string.format('%d', task.version), 'created_at', string.format('%d', task.created_at),
    'updated_at', string.format('%d', task.updated_at),
    'timeout_s', string.format('%d', task.timeout_s),
    'retention_s', string.format('%d', task.retention_s))
  if task.image_bytes > 0 then
    redis.call('HSET', record_key, 'image_bytes', string.format('%d', task.image_bytes))
  end
  if task.create_token ~= '' then
    redis.call('HSET', record_key, 'create_token', task.create_token)
  end
  if task.webhook_url ~= '' then
    if task.status == 'processing' and task.started_version == 0 then
      task.started_version = task.version
      redis.call('HSET', record_key, 'started_version', string.format('%d', task.version))
    end
    redis.call('PUBLISH', webhook_channel, id)
  end
  if TERMINAL[task.status] then
    redis.call('HDEL', record_key, 'deadline_ms')
    if task.retention_s > 0 then
      redis.call('EXPIRE', record_key, task.retention_s)
      if task.image_bytes > 0 then
        redis.call('EXPIRE', image_key or (record_key .. ':image'), task.retention_s)
      end
    else
      redis.call('PERSIST', record_key)
      if task.image_bytes > 0 then
        redis.call('PERSIST', image_key or (record_key .. ':image'))
      end
    end
  else
    local deadline = task.updated_at + task.timeout_s * 1000
    redis.call('HSET', record_key, 'deadline_ms', string.format('%d', deadline))
    redis.call('EXPIRE', record_key, task.timeout_s + BACKSTOP_S)
  end
  local json = encode(task)
  redis.call(publish, channel_key, json)
  return json
end

local function read_record()
  local values = redis.call('HMGET', record_key, unpack(FIELDS))
  local current = {}
  for i, name in ipairs(FIELDS) do
    current[name] = values[i] or false
  end
  -- Records written by plain HSET producers may lack fields; fill the contract's defaults.
  local task = {
    status = current.status or 'submitted',
    progress = tonumber(current.progress or '0'),
    type = current.type or '', angle = current.angle or '',
    image_url = current.image_url or '', image_base64 = current.image_base64 or '',
    error_message = current.error_message or '',
    version = tonumber(current.version or '0'),
    created_at = tonumber(current.created_at or '0'),
    updated_at = tonumber(current.updated_at or '0'),
    image_bytes = tonumber(current.image_bytes or '0'),
    timeout_s = tonumber(current.timeout_s or DEFAULT_TIMEOUT),
    deadline_ms = current.deadline_ms and tonumber(current.deadline_ms),
    retention_s = tonumber(current.retention_s or '86400'),
    create_token = current.create_token or '',
    webhook_url = current.webhook_url or '',
    started_version = tonumber(current.started_version or '0'),
  }
  if task.started_version == nil then
    return nil
  end
  if not KNOWN[task.status] or task.progress == nil or task.version == nil
      or task.created_at == nil or task.updated_at == nil or task.image_bytes == nil
      or task.timeout_s == nil or task.retention_s == nil or task.deadline_ms == nil
      and current.deadline_ms then
    return nil
  end
  return task
end

if change.op == 'timeout' then
  if redis.call('EXISTS', record_key) == 0 then
    return 'GONE'
  end
  local task = read_record()
  if task == nil then
    return reject('CORRUPT', 'task ' .. id .. ' has a malformed record')
  end
  if TERMINAL[task.status] then
    return 'FINISHED'
  end
  local deadline = task.deadline_ms or (task.updated_at + task.timeout_s * 1000)
  local now = now_ms()
  if now < deadline then
    return 'DUE ' .. string.format('%d', deadline)
  end
  task.status = 'failed'
  task.error_message = 'timed out: no change for ' .. string.format('%d', task.timeout_s)
    .. ' s (the worker stopped reporting)'
  task.version = task.version + 1
  task.updated_at = now
  return write_and_publish(task)
end

retention = retention or 86400

if change.op == 'create' then
  if redis.call('EXISTS', record_key) == 1 then
    if create_token ~= nil then
      local task = read_record()
      if task ~= nil and task.create_token == create_token then
        return encode(task)  -- this very create, sent again (a retry after a lost reply)
      end
    end
    return reject('EXISTS', 'task ' .. id .. ' already exists')
  end
  if change.status ~= nil and not KNOWN[change.status] then
    return reject('BAD_STATUS', 'unknown status ' .. change.status)
  end
  if change.status ~= nil and change.status ~= 'submitted' then
    return reject('BAD_TRANSITION', 'a task is created as submitted')
  end
  if change.progress ~= nil and change.progress ~= 0 then
    return reject('BAD_PROGRESS', 'a task is created with progress 0')
  end
  if change.image_url or change.image_base64 or change.error_message or staged then
    return reject('BAD_FIELD', 'a new task has no image and no error_message')
  end
  if webhook_url ~= nil then
    if webhook_channel == nil then
      return reject('BAD_REQUEST', 'a task with a webhook needs the key P:task:{' .. id .. '}')
    end
    redis.call('HSET', record_key, 'webhook_url', webhook_url,
      'webhook_events', webhook_events or 'completed,failed')
  end
  local now = now_ms()
  return write_and_publish({
    status = 'submitted', progress = 0, type = change.type or '', angle = change.angle or '',
    image_url = '', image_base64 = '', error_message = '', version = 1,
    created_at = now, updated_at = now, image_bytes = 0,
    timeout_s = change.timeout_s or DEFAULT_TIMEOUT, retention_s = retention,
    create_token = create_token or '', webhook_url = webhook_url or '', started_version = 0,
  })
end

if change.op ~= 'update' then
  return reject('BAD_REQUEST', 'op must be create, update or timeout')
end
if create_token ~= nil then
  return reject('BAD_REQUEST', 'create_token comes only with op=create')
end
if webhook_url ~= nil then
  return reject('BAD_FIELD', 'webhook_url and webhook_events are set at creation only')
end

if redis.call('EXISTS', record_key) == 0 then
  return reject('NOT_FOUND', 'task ' .. id .. ' does not exist')
end
local task = read_record()
if task == nil then
  return reject('CORRUPT', 'task ' .. id .. ' has a malformed record')
end
if TERMINAL[task.status] then
  -- A worker retrying its final call sends the very same change again: answer it with the
  -- current state, as for any change that alters nothing. Anything else is refused. A staged
  -- image is recognised by its length (its bytes never reach the script).
  local same = change.type == nil and change.angle == nil and change.timeout_s == nil
    and (change.status == nil or change.status == task.status)
    and (change.progress == nil or change.progress == task.progress)
    and (staged == nil or staged == task.image_bytes)
    and (error_message == nil or error_message == task.error_message)
  for _, name in ipairs({'image_url', 'image_base64'}) do
    same = same and (change[name] == nil or change[name] == task[name])
  end
  if same then
    return encode(task)
  end
  return reject('TERMINAL', 'task ' .. id .. ' is ' .. task.status .. ' and cannot change')
end
if change.type ~= nil or change.angle ~= nil then
  return reject('BAD_FIELD', 'type and angle are set at creation only')
end

local status = change.status or task.status
if not KNOWN[status] then
  return reject('BAD_STATUS', 'unknown status ' .. status)
end
if not NEXT[task.status][status] then
  return reject('BAD_TRANSITION', task.status .. ' cannot become ' .. status)
end

local progress = change.progress
if progress ~= nil then
  if not whole(progress, 0, 100) then
    return reject('BAD_PROGRESS', 'progress must be an integer from 0 to 100')
  end
  if progress < task.progress then
    return reject('PROGRESS_DECREASE',
      'progress cannot go from ' .. string.format('%d', task.progress) .. ' down to '
      .. string.format('%d', progress))
  end
end
if status == 'completed' then
  if progress ~= nil and progress ~= 100 then
    return reject('BAD_PROGRESS', 'a completed task has progress 100')
  end
  progress = 100
end
if (change.image_url ~= nil or inline ~= nil or staged ~= nil) and status ~= 'completed' then
  return reject('BAD_FIELD', 'an image is set only when the task completes')
end
if error_message ~= nil and status ~= 'failed' then
  return reject('BAD_FIELD', 'error_message is set only when the task fails')
end
if staged ~= nil and redis.call('STRLEN', upload_key) ~= staged then
  return reject('BAD_FIELD', 'the upload ' .. upload_key .. ' is missing or not image_bytes long')
end

local changed = false
local function set(name, value)
  if value ~= nil and value ~= task[name] then
    task[name] = value
    changed = true
  end
end
set('status', status)
set('progress', progress)
set('image_url', change.image_url)
set('image_base64', inline)
set('image_bytes', staged)
set('error_message', error_message)
set('timeout_s', change.timeout_s)
if not changed then
  return encode(task)
end
if staged ~= nil then
  redis.call('RENAME', upload_key, image_key)
end
task.version = task.version + 1
task.updated_at = now_ms()
task.retention_s = retention
return write_and_publish(task)
