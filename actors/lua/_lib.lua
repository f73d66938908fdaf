-- Shared preamble, prepended to every script by actors/store.py.
--
-- Every script receives the same first four ARGV:
--   ARGV[1] task key prefix: a task's hash is PREFIX .. id. The prefix holds
--           the queue's {hash tag}, so keys built from it stay in the slot of
--           the KEYS the script was given (Redis Cluster safe).
--   ARGV[2] events channel (JSON events for live views)
--   ARGV[3] done channel prefix: DONE .. id carries a task's final response
--   ARGV[4] wake channel: told whenever tasks become claimable (a number),
--           or will be in N ms ("in:N", a retry's backoff)
-- Script-specific arguments start at ARGV[5].

local PREFIX, EVENTS, DONE, WAKE = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

-- ScrapingRequest's default max_retries (a test keeps the two equal). A task
-- record leaves the field out at this value: a pending task stays in a
-- smaller jemalloc size class (see docs/benchmarks.md, memory per task).
local DEFAULT_MAX_RETRIES = 3

-- A task's max_retries from its record's raw field (false: the default). A
-- damaged value counts as 0: the task is not retried rather than stuck.
local function max_retries_of(raw)
  if raw == false then
    return DEFAULT_MAX_RETRIES
  end
  return tonumber(raw) or 0
end

-- Redis does not roll a script back: a script that fails after its first
-- write leaves the writes before the failure in place (a task record in no
-- queue set, say). So after its first write a script must not fail. The three
-- helpers below are how: a number read from Redis is converted with a default
-- (a damaged value never turns into a nil that arithmetic trips on), and
-- publishing and counting never raise (an ACL user without channel rights, a
-- counter damaged from outside). A script that can fail otherwise does every
-- read and check that could raise before its first write.

-- A number read from Redis, or `default` when it is missing or not a number.
local function num(raw, default)
  return tonumber(raw) or default
end

-- PUBLISH that never aborts the script: a refusal (an ACL user without
-- rights on the channel: Redis 7 gives a new user none) loses only the
-- message, never the state change it announces.
local function publish(channel, message)
  redis.pcall('PUBLISH', channel, message)
end

-- HINCRBY of a counter that never aborts the script: a counter damaged from
-- outside (not an integer) starts again at `by`.
local function count_up(hash, field, by)
  local result = redis.pcall('HINCRBY', hash, field, by)
  if type(result) == 'table' then
    redis.pcall('HSET', hash, field, by)
  end
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Whether to publish the next event of this script call. Redis drops a
-- message nobody is subscribed to, so a call that has many to send (a batch
-- of claims, completions or enqueues) asks once, at its second event,
-- whether anyone listens on this server (on the channel, or on any pattern)
-- and skips encoding and publishing the rest if not: ~20% of Redis's work
-- per task in the workers. The first event is published without asking,
-- which costs less than the question. Subscribe on the server the scripts
-- run on: a subscriber on a replica alone hears only first events.
local events_asked, events_heard = 0, true
local function events_wanted()
  events_asked = events_asked + 1
  if events_asked == 2 then
    -- A refused question (ACL) counts as "someone listens": publish() decides.
    local subscribers = redis.pcall('PUBSUB', 'NUMSUB', EVENTS)
    local patterns = redis.pcall('PUBSUB', 'NUMPAT')
    events_heard = type(patterns) ~= 'number' or patterns > 0
      or type(subscribers[2]) ~= 'number' or subscribers[2] > 0
  end
  return events_heard
end

local function emit(name, now, fields)
  if events_wanted() then
    fields.event = name
    fields.ts = now / 1000
    publish(EVENTS, cjson.encode(fields))
  end
end

-- Put a task in a terminal state (completed, failed, cancelled): store its
-- response, start its retention clock and hand the response to any waiter.
-- data_json is raw JSON (already validated by the client) or nil.
local function finish(id, status, data_json, err, exec_time, now, ttl_ms)
  local key = PREFIX .. id
  local response = '{"request_id":' .. cjson.encode(id)
    .. ',"status":"' .. status .. '"'
    .. ',"data":' .. (data_json or 'null')
    .. ',"error":' .. (err and cjson.encode(err) or 'null')
    .. ',"execution_time":' .. (exec_time or 'null')
    .. ',"completed_at":' .. string.format('%.3f', now / 1000) .. '}'
  redis.call('HSET', key, 'status', status, 'response', response, 'finished_at', now)
  redis.call('PEXPIRE', key, ttl_ms)
  publish(DONE .. id, response)
end

-- A task's queue score. A record damaged from outside (not a number) sorts
-- first rather than aborting the script half-way: Redis does not roll a
-- script back, so a script must never fail after its first write.
local function score_of(id)
  return tonumber(redis.call('HGET', PREFIX .. id, 'score')) or 0
end

-- Move up to `limit` retries whose due time has come (`now`, ms) from the
-- `delayed` zset back to `pending`, at their stored queue score, status
-- `pending`. Shared by claim (a worker promotes before it claims) and
-- promote (the reaper's, while no worker claims). A damaged score does not
-- make it fail half-way (score_of). Returns how many were promoted.
local function promote_due(pending, delayed, limit, now)
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    redis.call('ZREM', delayed, id)
    redis.call('ZADD', pending, score_of(id), id)
    redis.call('HSET', PREFIX .. id, 'status', 'pending')
  end
  return #due
end

-- Append a failed attempt to the task's history (the last 20 are kept).
local function add_history(id, attempt, err, worker, now)
  local key = PREFIX .. id
  local ok, history = pcall(cjson.decode, redis.call('HGET', key, 'history') or '[]')
  if not ok or type(history) ~= 'table' then
    history = {}  -- a damaged history is replaced, never a reason to fail
  end
  history[#history + 1] = {attempt = tonumber(attempt), error = err, worker = worker, at = now / 1000}
  if #history > 20 then
    table.remove(history, 1)
  end
  redis.call('HSET', key, 'history', cjson.encode(history), 'error', err)
end

-- The fencing check: a report counts only from the worker that holds the
-- task's current attempt. A worker whose lease expired and was taken over
-- (or whose task was cancelled) is refused.
local function holds_lease(id, worker, attempt)
  local f = redis.call('HMGET', PREFIX .. id, 'status', 'worker', 'attempt')
  return f[1] == 'running' and f[2] == worker and f[3] == attempt
end

-- Rate limits -----------------------------------------------------------------
-- A task names its rate keys in its `rate_keys` field ("domain:HOST script:NAME",
-- space separated). The limits hash maps a rate key to tasks per second;
-- `default_domain` applies to every domain key without its own entry. A key
-- may also be paused (HTTP 429, or its circuit breaker open) until a time.
-- Starts are counted with GCRA on the Redis clock: a key at rate r admits a
-- burst of ceil(r) (at least 1), then one start every 1000 / r ms.

local function split_keys(text)
  local keys = {}
  for key in string.gmatch(text or '', '%S+') do
    keys[#keys + 1] = key
  end
  return keys
end

local function rate_of(limits, key)
  local rate = redis.call('HGET', limits, key)
  if not rate and string.sub(key, 1, 7) == 'domain:' then
    rate = redis.call('HGET', limits, 'default_domain')
  end
  rate = tonumber(rate)
  return rate and rate > 0 and rate or nil  -- a damaged rate limits nothing
end

-- The first of `keys` that holds tasks back (limited or paused), or nil.
local function gate_for(limits, paused, keys)
  for _, key in ipairs(keys) do
    if redis.call('HEXISTS', paused, key) == 1 or rate_of(limits, key) then
      return key
    end
  end
  return nil
end

-- Try to start a task with these rate keys now. Returns 0 and takes a start
-- from every limited key, or returns the time (ms) it may start and the key
-- that holds it back, taking nothing. `breaker_settings` is the hash with the
-- circuit breaker's `failures` threshold and `cooldown_ms`.
local function try_start(limits, state, paused, breaker, breaker_settings, keys, now)
  local wait, blocker = 0, nil
  local plans = {}
  for _, key in ipairs(keys) do
    local until_ms = num(redis.call('HGET', paused, key), 0)
    if until_ms > now then
      if until_ms > wait then wait, blocker = until_ms, key end
    else
      if until_ms > 0 then redis.call('HDEL', paused, key) end
      local rate = rate_of(limits, key)
      if rate then
        local interval = 1000 / rate
        local tolerance = interval * (math.max(1, math.ceil(rate)) - 1)
        local tat = math.max(num(redis.call('HGET', state, key), 0), now)
        if tat - now > tolerance then
          if tat - tolerance > wait then wait, blocker = tat - tolerance, key end
        else
          plans[#plans + 1] = {key, tat + interval}
        end
      end
    end
  end
  if wait > 0 then
    return wait, blocker
  end
  for _, plan in ipairs(plans) do
    redis.call('HSET', state, plan[1], plan[2])
  end
  -- A key whose breaker is open lets this one task through as its probe and
  -- stays paused until the probe reports (success resumes it, failure re-opens).
  local threshold = num(redis.call('HGET', breaker_settings, 'failures'), 0)
  if threshold > 0 then
    for _, key in ipairs(keys) do
      if num(redis.call('HGET', breaker, key), 0) >= threshold then
        local cooldown = num(redis.call('HGET', breaker_settings, 'cooldown_ms'), 30000)
        redis.call('HSET', paused, key, now + cooldown)
      end
    end
  end
  return 0, nil
end

-- Put a pending task into the gate of `key` (it waits there, keeping its
-- queue score, until the key admits it) and make sure the key is scheduled.
local function enter_gate(gates, stats, gate_prefix, key, id, score, ready_at)
  redis.call('ZADD', gate_prefix .. key, score, id)
  redis.call('HSET', PREFIX .. id, 'gate', key)
  redis.call('ZADD', gates, 'NX', ready_at, key)
  count_up(stats, 'gated', 1)
end
