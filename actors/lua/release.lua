-- release: a worker hands leased tasks back without burning an attempt
-- (drain on shutdown, or a script that was rate limited by the site).
--
-- KEYS[1] running  zset id -> lease deadline
-- KEYS[2] pending  zset id -> priority/FIFO score
-- KEYS[3] delayed  zset id -> due time
-- KEYS[4] stats    hash of monotonic counters
-- KEYS[5] paused   hash rate key -> paused until (ms)
-- KEYS[6] domains     politeness: per-domain hashes beside this index (slots given back; a 429/503
--                     halves the domain's window and, adaptive, its learned rate)
-- KEYS[7] politeness  hash: the in-flight cap and adaptive settings
-- KEYS[8] gates       zset rate key -> next start (ms)
-- KEYS[9] limits      hash rate key -> tasks/s (a learned rate starts below it)
-- KEYS[10] rate_state hash rate key -> GCRA state (the pause ends with one probe)
-- KEYS[11] guard   never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] worker id
-- ARGV[6] delay in ms: 0 = claimable at once (pending), else retry later (delayed)
-- ARGV[7] reason (for the event), e.g. "drain", "rate_limited" (429),
--         "unavailable" (503)
-- ARGV[8] rate key to pause ("" = none) and ARGV[9] for how long (ms): a
--         site answered 429 or 503, so the key waits on every host; the
--         pause is clamped to the politeness max_retry_after
-- ARGV[10] number of leases n, then n pairs: request_id, attempt
--
-- A task keeps its original place in the queue (its stored score).
-- Returns the number of tasks handed back (leases not held are skipped).

local worker, delay, reason, n = ARGV[5], tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[10])
local now = now_ms()
use_domains(KEYS[6], KEYS[7], KEYS[8])
if ARGV[8] ~= '' then
  local pause = math.min(num(ARGV[9], 0), policy_num('max_retry_after_ms', 3600000))
  local until_ms = now + pause
  if until_ms > num(redis.call('HGET', KEYS[5], ARGV[8]), 0) then
    redis.call('HSET', KEYS[5], ARGV[8], until_ms)
    emit('rate.paused', now, {key = ARGV[8], reason = reason, seconds = pause / 1000})
  end
  if is_domain(ARGV[8]) then
    count_up(KEYS[4], 'throttled:' .. reason, 1)
    learn_throttle(KEYS[9], KEYS[10], ARGV[8], now, until_ms, reason)
  end
end
local released = 0
for i = 1, n do
  local id, attempt = ARGV[10 + 2 * i - 1], ARGV[10 + 2 * i]
  local held, slot = holds_lease(id, worker, attempt)
  if held then
    local key = PREFIX .. id
    redis.call('ZREM', KEYS[1], id)
    free_slot(slot, now, false, nil)
    redis.call('HSET', key, 'attempt', tonumber(attempt) - 1)
    redis.call('HDEL', key, 'worker')
    if delay > 0 then
      redis.call('HSET', key, 'status', 'retrying', 'ready_at', now + delay)
      redis.call('ZADD', KEYS[3], now + delay, id)
    else
      redis.call('HSET', key, 'status', 'pending', 'ready_at', now)
      redis.call('ZADD', KEYS[2], score_of(id), id)
    end
    emit('task.requeued', now, {request_id = id, worker_id = worker, reason = reason})
    released = released + 1
  end
end
if released > 0 then
  count_up(KEYS[4], 'requeued', released)
  publish(WAKE, delay == 0 and released or ('in:' .. delay))
end
return released
