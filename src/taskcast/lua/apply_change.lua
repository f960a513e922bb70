-- taskcast: apply one change to a task record and publish the new state, atomically.
--
-- This file is the producer contract (README, "Redis contract"). Producers in any language
-- may EVAL/EVALSHA it exactly as shipped:
--
--   EVALSHA <sha1> 2 P:task:{ID} P:task:{ID}:events <change-json>
--
-- <change-json> is a JSON object:
--   op             "create" | "update"                                  (required)
--   task_id        decimal string (or a JSON integer below 2^53)        (required)
--   status         "submitted" | "processing" | "completed" | "failed"
--   progress       integer 0..100
--   type, angle    strings, only with op=create
--   image_url, image_base64   strings, only when the new status is "completed"
--   error_message  string, only when the new status is "failed"
--   retention_s    seconds a finished record is kept (default 86400; 0 = forever)
--   publish        "PUBLISH" (default) or "SPUBLISH" (Redis Cluster sharded pub/sub)
--
-- On success the script returns the task object (JSON) after the change; when the change alters
-- anything it bumps version, sets updated_at, writes the record and publishes that same JSON.
-- A change that alters nothing returns the current state and writes nothing (safe retries),
-- also on a finished task (a worker repeating its completion gets the state, not TERMINAL).
-- A rejected change writes and publishes nothing and returns an error reply
-- "REJECTED <REASON> <message>"; REASON is one of
--   BAD_REQUEST BAD_STATUS BAD_TRANSITION BAD_PROGRESS PROGRESS_DECREASE BAD_FIELD
--   EXISTS NOT_FOUND TERMINAL CORRUPT

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
  image_url = true, image_base64 = true, error_message = true, retention_s = true, publish = true,
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
if type(id) ~= 'string' or not string.match(id, '^%d+$') then
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

local publish = change.publish or 'PUBLISH'
if publish ~= 'PUBLISH' and publish ~= 'SPUBLISH' then
  return reject('BAD_REQUEST', 'publish must be PUBLISH or SPUBLISH')
end
-- Checked before anything is written: an EXPIRE that fails after the HSET would leave the
-- record changed and unpublished (Redis does not roll back a script's writes).
local MAX_RETENTION = 3153600000  -- 100 years
local retention = change.retention_s or 86400
if type(retention) ~= 'number' or not (retention >= 0 and retention <= MAX_RETENTION)
    or math.floor(retention) ~= retention then
  return reject('BAD_REQUEST', 'retention_s must be an integer from 0 to 3153600000')
end

for _, name in ipairs({'status', 'type', 'angle', 'image_url', 'image_base64', 'error_message'}) do
  if change[name] ~= nil and type(change[name]) ~= 'string' then
    return reject('BAD_REQUEST', name .. ' must be a string')
  end
end

local KNOWN = { submitted = true, processing = true, completed = true, failed = true }
local TERMINAL = { completed = true, failed = true }
local NEXT = {
  submitted = { submitted = true, processing = true, completed = true, failed = true },
  processing = { processing = true, completed = true, failed = true },
}

local FIELDS = {
  'task_id', 'status', 'progress', 'type', 'angle', 'image_url', 'image_base64',
  'error_message', 'version', 'created_at', 'updated_at',
}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function encode(task)
  local s = cjson.encode
  return '{"task_id":' .. id
    .. ',"status":' .. s(task.status)
    .. ',"progress":' .. string.format('%d', task.progress)
    .. ',"type":' .. s(task.type)
    .. ',"angle":' .. s(task.angle)
    .. ',"image":{"image_base64":' .. s(task.image_base64)
    .. ',"image_url":' .. s(task.image_url) .. '}'
    .. ',"error_message":' .. s(task.error_message)
    .. ',"version":' .. string.format('%d', task.version)
    .. ',"updated_at":' .. string.format('%d', task.updated_at) .. '}'
end

local function write_and_publish(task)
  redis.call('HSET', record_key,
    'task_id', id, 'status', task.status, 'progress', string.format('%d', task.progress),
    'type', task.type, 'angle', task.angle, 'image_url', task.image_url,
    'image_base64', task.image_base64, 'error_message', task.error_message,
    'version', string.format('%d', task.version), 'created_at', string.format('%d', task.created_at),
    'updated_at', string.format('%d', task.updated_at))
  if TERMINAL[task.status] then
    if retention > 0 then
      redis.call('EXPIRE', record_key, retention)
    else
      redis.call('PERSIST', record_key)
    end
  end
  local json = encode(task)
  redis.call(publish, channel_key, json)
  return json
end

if change.op == 'create' then
  if redis.call('EXISTS', record_key) == 1 then
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
  if change.image_url or change.image_base64 or change.error_message then
    return reject('BAD_FIELD', 'a new task has no image and no error_message')
  end
  local now = now_ms()
  return write_and_publish({
    status = 'submitted', progress = 0, type = change.type or '', angle = change.angle or '',
    image_url = '', image_base64 = '', error_message = '', version = 1,
    created_at = now, updated_at = now,
  })
end

if change.op ~= 'update' then
  return reject('BAD_REQUEST', 'op must be create or update')
end

if redis.call('EXISTS', record_key) == 0 then
  return reject('NOT_FOUND', 'task ' .. id .. ' does not exist')
end
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
}
if not KNOWN[task.status] or task.progress == nil or task.version == nil
    or task.created_at == nil or task.updated_at == nil then
  return reject('CORRUPT', 'task ' .. id .. ' has a malformed record')
end
if TERMINAL[task.status] then
  -- A worker retrying its final call sends the very same change again: answer it with the
  -- current state, as for any change that alters nothing. Anything else is refused.
  local same = change.type == nil and change.angle == nil
    and (change.status == nil or change.status == task.status)
    and (change.progress == nil or change.progress == task.progress)
  for _, name in ipairs({'image_url', 'image_base64', 'error_message'}) do
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
  if type(progress) ~= 'number' or math.floor(progress) ~= progress
      or progress < 0 or progress > 100 then
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
if (change.image_url ~= nil or change.image_base64 ~= nil) and status ~= 'completed' then
  return reject('BAD_FIELD', 'an image is set only when the task completes')
end
if change.error_message ~= nil and status ~= 'failed' then
  return reject('BAD_FIELD', 'error_message is set only when the task fails')
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
set('image_base64', change.image_base64)
set('error_message', change.error_message)
if not changed then
  return encode(task)
end
task.version = task.version + 1
task.updated_at = now_ms()
return write_and_publish(task)
