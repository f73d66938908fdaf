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
    events_heard = redis.call('PUBSUB', 'NUMSUB', EVENTS)[2] > 0
      or redis.call('PUBSUB', 'NUMPAT') > 0
  end
  return events_heard
end

local function emit(name, now, fields)
  if events_wanted() then
    fields.event = name
    fields.ts = now / 1000
    redis.call('PUBLISH', EVENTS, cjson.encode(fields))
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
  redis.call('PUBLISH', DONE .. id, response)
end

-- A task's queue score. A record damaged from outside (not a number) sorts
-- first rather than aborting the script half-way: Redis does not roll a
-- script back, so a script must never fail after its first write.
local function score_of(id)
  return tonumber(redis.call('HGET', PREFIX .. id, 'score')) or 0
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
  return rate and tonumber(rate)
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
    local until_ms = tonumber(redis.call('HGET', paused, key) or '0')
    if until_ms > now then
      if until_ms > wait then wait, blocker = until_ms, key end
    else
      if until_ms > 0 then redis.call('HDEL', paused, key) end
      local rate = rate_of(limits, key)
      if rate then
        local interval = 1000 / rate
        local tolerance = interval * (math.max(1, math.ceil(rate)) - 1)
        local tat = math.max(tonumber(redis.call('HGET', state, key) or '0'), now)
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
  local threshold = tonumber(redis.call('HGET', breaker_settings, 'failures') or '0')
  if threshold > 0 then
    for _, key in ipairs(keys) do
      if tonumber(redis.call('HGET', breaker, key) or '0') >= threshold then
        local cooldown = tonumber(redis.call('HGET', breaker_settings, 'cooldown_ms') or '30000')
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
  redis.call('HINCRBY', stats, 'gated', 1)
end
