-- enqueue: add one or more tasks, all or nothing, unless backpressure refuses.
--
-- KEYS[1] pending       zset id -> score (-priority * 1e12 + sequence): ZPOPMIN
--                       yields the highest priority first, FIFO within one
-- KEYS[2] seq           string, the FIFO sequence counter
-- KEYS[3] stats         hash of monotonic counters (and `gated`, tasks in gates)
-- KEYS[4] backpressure  hash published by the governor: state, rate, updated_at,
--                       drain; enqueue keeps its token bucket there (tokens, tokens_at)
-- KEYS[5] limits        hash rate key -> tasks/s
-- KEYS[6] paused        hash rate key -> paused until (ms)
-- KEYS[7] gates         zset rate key -> when its next task may start (ms)
-- KEYS[8] guard         never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] gate key prefix
-- ARGV[6] high watermark: the depth (pending + gated) no enqueue may pass
-- ARGV[7] governor staleness (ms): older published state is ignored (fail open
--         to the high watermark) so a dead governor cannot wedge the queue
-- ARGV[8] number of tasks n, then n groups of 6: request_id, request_json,
--         priority, max_retries, expires_in_ms (0 = never), rate_keys ("" = none)
--
-- Returns {code, value}
--   {1, written}: every task is stored; a task whose id already holds the very
--                 same request counts as stored, so a client retry after a lost
--                 reply is harmless (written counts only new ones)
--   {0, index}:   task number `index` (1-based) reuses an existing id with a
--                 different request; nothing was written
--   {2, retry_after_ms, state}: refused by backpressure; nothing was written

local gate_prefix, high, stale_ms = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local n = tonumber(ARGV[8])
local now = now_ms()
local ZADD_SLICE = 2000  -- ZADD arguments per call: 1,000 tasks (score, id)

local fresh = {}
local in_batch = {}  -- id -> request, for ids repeated within this call
for i = 1, n do
  local base = 8 + (i - 1) * 6
  local id, request = ARGV[base + 1], ARGV[base + 2]
  local existing = in_batch[id] or redis.call('HGET', PREFIX .. id, 'request')
  if existing then
    if existing ~= request then
      return {0, i}
    end
  else
    fresh[#fresh + 1] = base
    in_batch[id] = request
  end
end
if #fresh == 0 then
  return {1, 0}
end

-- Every read (and every check that could raise an error) comes before the
-- first write: Redis does not roll a script back, so a script that failed
-- half-way would leave task records without a queue entry.

-- Backpressure: the hard cap first, then the governor's published state.
local depth = redis.call('ZCARD', KEYS[1]) + num(redis.call('HGET', KEYS[3], 'gated'), 0)
local bp = redis.call('HMGET', KEYS[4], 'state', 'rate', 'updated_at', 'drain', 'tokens', 'tokens_at')
local drain = math.max(num(bp[4], 0), 1)
if depth + #fresh > high then
  return {2, math.min(60000, math.max(1000, (depth + #fresh - high) / drain * 1000)), 'closed'}
end
local tokens_left = nil  -- set when the throttle's token bucket pays for this batch
if bp[1] and now - num(bp[3], 0) <= stale_ms then
  if bp[1] == 'closed' then
    return {2, 1000, 'closed'}
  elseif bp[1] == 'throttled' then
    local rate = math.max(num(bp[2], 0), 0.001)
    local burst = math.max(#fresh, rate / 10)
    local tokens = num(bp[5], burst)
    tokens = math.min(burst, tokens + math.max(0, now - num(bp[6], now)) * rate / 1000)
    if tokens < #fresh then
      return {2, math.ceil((#fresh - tokens) / rate * 1000), 'throttled'}
    end
    tokens_left = tokens - #fresh
  end
end

-- Which tasks wait in a rate key's gate (read only; the gate sets' types are
-- checked here, by ZCARD, so that their ZADDs below cannot fail).
local gates = {}  -- base -> rate key
if redis.call('EXISTS', KEYS[5], KEYS[6]) > 0 then
  for _, base in ipairs(fresh) do
    if ARGV[base + 6] ~= '' then
      local gate = gate_for(KEYS[5], KEYS[6], split_keys(ARGV[base + 6]))
      if gate then
        redis.call('ZCARD', gate_prefix .. gate)
        gates[base] = gate
      end
    end
  end
  if next(gates) then
    redis.call('ZCARD', KEYS[7])
  end
end

-- Writes. The counters first: they are the only writes a damaged value could
-- fail (the task keys, the queue and the stats hash were type-checked above).
-- One sequence number per task, drawn in one call for the whole batch.
local seq = redis.call('INCRBY', KEYS[2], #fresh) - #fresh
count_up(KEYS[3], 'enqueued', #fresh)
if tokens_left then
  redis.call('HSET', KEYS[4], 'tokens', tokens_left, 'tokens_at', now)
end
local ready = {}  -- ZADD arguments for the tasks claimable now
for _, base in ipairs(fresh) do
  local id = ARGV[base + 1]
  seq = seq + 1
  local score = -tonumber(ARGV[base + 3]) * 1e12 + seq
  -- No `attempt` field (absent: 0 until the first claim), and no `max_retries`
  -- at its default: a smaller record.
  local fields = {'status', 'pending', 'request', ARGV[base + 2], 'score', score,
    'enqueued_at', now}
  if tonumber(ARGV[base + 4]) ~= DEFAULT_MAX_RETRIES then
    fields[#fields + 1] = 'max_retries'
    fields[#fields + 1] = ARGV[base + 4]
  end
  local expires_in = tonumber(ARGV[base + 5])
  if expires_in > 0 then
    fields[#fields + 1] = 'expires_at'
    fields[#fields + 1] = now + expires_in
  end
  if ARGV[base + 6] ~= '' then
    fields[#fields + 1] = 'rate_keys'
    fields[#fields + 1] = ARGV[base + 6]
  end
  redis.call('HSET', PREFIX .. id, unpack(fields))
  local gate = gates[base]
  if gate then
    enter_gate(KEYS[7], KEYS[3], gate_prefix, gate, id, score, now)
  else
    ready[#ready + 1] = score
    ready[#ready + 1] = id
  end
  -- Ids match REQUEST_ID_PATTERN (checked by the client): no JSON escaping needed.
  local heard, kept = events_wanted(), history_kept()
  if heard or kept then
    local text = '{"event":"task.enqueued","ts":' .. (now / 1000) .. ',"request_id":"' .. id .. '"}'
    if heard then
      publish(EVENTS, text)
    end
    keep(text)
  end
end
-- In slices: unpack() puts every argument on Lua's stack, which holds ~8,000.
for first = 1, #ready, ZADD_SLICE do
  redis.call('ZADD', KEYS[1], unpack(ready, first, math.min(#ready, first + ZADD_SLICE - 1)))
end
publish(WAKE, #fresh)
return {1, #fresh}
