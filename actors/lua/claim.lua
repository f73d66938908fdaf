-- claim: promote due retries (as promote.lua does), then lease up to `count`
-- tasks to one worker.
--
-- KEYS[1]  pending           zset id -> priority/FIFO score
-- KEYS[2]  running           zset id -> lease deadline (ms, Redis clock)
-- KEYS[3]  delayed           zset id -> due time (ms, Redis clock)
-- KEYS[4]  stats             hash of monotonic counters
-- KEYS[5]  limits            hash rate key -> tasks/s
-- KEYS[6]  rate_state        hash rate key -> GCRA theoretical arrival time (ms)
-- KEYS[7]  paused            hash rate key -> paused until (ms)
-- KEYS[8]  breaker           hash rate key -> consecutive failures
-- KEYS[9]  gates             zset rate key -> when its next task may start (ms)
-- KEYS[10] breaker_settings  hash: failures (threshold), cooldown_ms
-- KEYS[11] dead              zset id -> time dead-lettered (a damaged record goes there)
-- KEYS[12] domains           zset: politeness index; per-domain hashes beside it (_lib.lua)
-- KEYS[13] politeness        hash: the in-flight cap and adaptive settings
-- KEYS[14] guard             never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5]  worker id
-- ARGV[6]  count: tasks to claim
-- ARGV[7]  lease in ms
-- ARGV[8]  at most this many due retries are promoted per call
-- ARGV[9]  result ttl in ms (a task past its expires_at is cancelled here)
-- ARGV[10] gate key prefix
--
-- A task of a domain at its in-flight cap (all hosts) waits in the domain's
-- gate too, and takes a slot when it starts (the record's `slot` field).
-- Rate-limited work never blocks the rest: gated keys whose time has come are
-- served first, the one that has waited longest first; a task popped from
-- pending whose key is over its limit (limits changed since its enqueue, or
-- the key was paused) moves into that key's gate instead of starting.
-- Each claimed task gets attempt + 1: the attempt is the lease's fencing
-- token, checked by complete, fail, renew and release.
-- Returns {wait_ms, id, attempt, request_json, queued_ms, id, attempt, ...}
--   queued_ms: how long the task waited since it last became claimable
--   wait_ms: ms until the next retry or gated task is due (-1 if none); lets
--   an idle worker sleep exactly that long instead of polling.

local worker, count = ARGV[5], tonumber(ARGV[6])
local lease_ms, promote_limit, ttl_ms = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local gate_prefix = ARGV[10]
local LIMITS, STATE, PAUSED, BREAKER, GATES = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local BREAKER_SETTINGS = KEYS[10]
use_domains(KEYS[12], KEYS[13], GATES)

local now = now_ms()

-- An expired task is cancelled, not started: it must not use up a rate.
-- A damaged expires_at (not a number) never expires.
local function expired(expires_at)
  return num(expires_at, math.huge) <= now
end

promote_due(KEYS[1], KEYS[3], promote_limit, now)

-- The fields a claim reads of each candidate task, in one HMGET.
local RECORD_FIELDS = {'request', 'expires_at', 'rate_keys', 'attempt', 'ready_at', 'enqueued_at'}

local out = {-1}
local claimed = 0

-- Lease one task (its rate keys already admitted it), or cancel it if it
-- expired, or dead-letter a damaged record. f is its HMGET of RECORD_FIELDS.
local function start(id, f, slot)
  local request, expires_at = f[1], f[2]
  if expired(expires_at) then
    finish(id, 'cancelled', nil, 'expired', nil, now, ttl_ms)
    count_up(KEYS[4], 'cancelled', 1)
    emit('task.cancelled', now, {request_id = id, reason = 'expired'})
    return
  end
  local key = PREFIX .. id
  -- Not HINCRBY: a damaged attempt field must not abort the claim half-way
  -- (Redis does not roll back the writes before an error). A task never
  -- started has no attempt field (enqueue leaves it out: memory per task).
  local previous = f[4] == false and 0 or tonumber(f[4])
  if not previous then
    local err = 'invalid task record: attempt is not a number'
    redis.call('ZADD', KEYS[11], now, id)
    finish(id, 'failed', nil, err, nil, now, ttl_ms)
    count_up(KEYS[4], 'failed', 1)
    emit('task.failed', now, {request_id = id, error = err})
    return
  end
  local attempt = previous + 1
  -- A task that names a domain has `slot` written on every start ('' = none),
  -- so a slot an earlier attempt took is never given back twice (free_slot
  -- runs once per attempt, on its way out of `running`).
  if slot or is_domain(f[3] or '') then
    redis.call('HSET', key, 'attempt', attempt, 'status', 'running', 'worker', worker,
      'started_at', now, 'slot', slot or '')
  else
    redis.call('HSET', key, 'attempt', attempt, 'status', 'running', 'worker', worker,
      'started_at', now)
  end
  redis.call('ZADD', KEYS[2], now + lease_ms, id)
  emit_task('task.started', now, id, worker, attempt)
  out[#out + 1] = id
  out[#out + 1] = attempt
  out[#out + 1] = request
  -- Its queue wait: since it last became claimable (the worker counts it).
  out[#out + 1] = math.max(0, now - num(f[5] or f[6], now))
  claimed = claimed + 1
end

-- 1. Gated keys whose next start is due.
if count > 0 and redis.call('EXISTS', GATES) == 1 then
  for _, gate in ipairs(redis.call('ZRANGEBYSCORE', GATES, '-inf', now, 'LIMIT', 0, count)) do
    local queue = gate_prefix .. gate
    while true do
      local head = redis.call('ZRANGE', queue, 0, 0)[1]
      if not head then
        redis.call('ZREM', GATES, gate)
        break
      end
      local f = redis.call('HMGET', PREFIX .. head, unpack(RECORD_FIELDS))
      local wait, blocker, slot = 0, nil, nil
      if f[1] and not expired(f[2]) then
        wait, blocker, slot = try_start(
          LIMITS, STATE, PAUSED, BREAKER, BREAKER_SETTINGS, split_keys(f[3]), now)
      end
      if wait > 0 then
        redis.call('ZADD', GATES, wait, gate)
        break
      end
      redis.call('ZREM', queue, head)
      count_up(KEYS[4], 'gated', -1)
      if f[1] then
        redis.call('HDEL', PREFIX .. head, 'gate')
        start(head, f, slot)
      end
      if claimed >= count then
        redis.call('ZADD', GATES, 'XX', now, gate)  -- still due: back of the line
        break
      end
    end
    if claimed >= count then
      break
    end
  end
end

-- 2. The main queue.
-- Tasks that name a domain are also looked at when a cap or learned rates apply.
local gating = redis.call('EXISTS', LIMITS, PAUSED) > 0
local polite = policy('active') == '1'
-- With no limits, pauses or breaker counts anywhere, only a task's domain can
-- hold it back, through its slots, unless it has a learned rate: such a task
-- takes its domain's slot without try_start's walk over every key (its
-- domain is the first of its rate keys, actors/ratelimits.py).
local function plain_domain(rate_keys)
  return not gating and not exists_now(BREAKER) and string.match(rate_keys, '^%S+')
end
local diverted = 0
while claimed < count and diverted < 1000 do  -- bounded: a call never blocks Redis long
  local wanted = count - claimed
  local popped = redis.call('ZPOPMIN', KEYS[1], wanted)
  if #popped == 0 then
    break
  end
  for i = 1, #popped, 2 do
    local id = popped[i]
    local f = redis.call('HMGET', PREFIX .. id, unpack(RECORD_FIELDS))
    if f[1] then  -- else the record is gone (purged): nothing to run
      local wait, blocker, slot = 0, nil, nil
      if f[3] and (gating or (polite and is_domain(f[3]))) and not expired(f[2]) then
        local domain = plain_domain(f[3])
        if domain and not is_paced(domain) then
          wait, slot = take_domain_slot(domain, domain_hash(domain), nil, nil, nil, now)
          blocker = domain
        else
          wait, blocker, slot = try_start(
            LIMITS, STATE, PAUSED, BREAKER, BREAKER_SETTINGS, split_keys(f[3]), now)
        end
      end
      if wait > 0 then
        enter_gate(GATES, KEYS[4], gate_prefix, blocker, id, popped[i + 1], wait)
        diverted = diverted + 1
      else
        start(id, f, slot)
      end
    end
  end
  if #popped < 2 * wanted then
    break  -- the queue is empty now: no need to ask again
  end
end

if claimed > 0 then
  count_up(KEYS[4], 'started', claimed)
end
stamp_domains(now)
if claimed < count then
  local next_due = -1
  for _, zset in ipairs({KEYS[3], GATES}) do
    local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
    if #first > 0 then
      local in_ms = math.max(0, num(first[2], now) - now)
      if next_due < 0 or in_ms < next_due then next_due = in_ms end
    end
  end
  out[1] = next_due
end
return out
