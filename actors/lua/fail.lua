-- fail: a leased task's attempt failed; retry it later or dead-letter it.
--
-- KEYS[1] running           zset id -> lease deadline
-- KEYS[2] delayed           zset id -> due time
-- KEYS[3] dead              zset id -> time it was dead-lettered
-- KEYS[4] stats             hash of monotonic counters
-- KEYS[5] breaker           hash rate key -> consecutive failures
-- KEYS[6] paused            hash rate key -> paused until (ms)
-- KEYS[7] breaker_settings  hash: failures (threshold), cooldown_ms
-- KEYS[8] domains           politeness: per-domain hashes beside this index (the task's slot is given back)
-- KEYS[9] politeness        hash: the in-flight cap and adaptive settings
-- KEYS[10] gates            zset rate key -> next start (ms)
-- KEYS[11] guard            never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5]  worker id
-- ARGV[6]  request id
-- ARGV[7]  attempt (fencing token)
-- ARGV[8]  error text
-- ARGV[9]  permanent: 1 = no retry (unknown script, invalid task), 0 = retry if allowed
-- ARGV[10] retry_backoff ms (delay before the first retry)
-- ARGV[11] retry_backoff_max ms
-- ARGV[12] jitter, a client-drawn number in [0, 1): the delay is scaled by 0.75 .. 1.25
-- ARGV[13] result ttl in ms
--
-- The delay before retry k (k = attempt) is min(max, backoff * 2^(k-1)) with
-- jitter, measured on the Redis clock. Retries are allowed while
-- attempt <= max_retries, so a task runs at most max_retries + 1 times.
-- Every failure appends {attempt, error, worker, at} to the task's history
-- (the last 20 kept). A retryable failure also counts against the task's
-- domain key: `failures` in a row pause that key for `cooldown_ms` on
-- every host (the circuit breaker opens).
--
-- Returns {code, delay_ms}: code 1 retrying, 2 dead-lettered, 0 refused
-- (lease not held).

local worker, id, attempt, err = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local permanent = ARGV[9] == '1'
local backoff, backoff_max = tonumber(ARGV[10]), tonumber(ARGV[11])
local jitter, ttl_ms = tonumber(ARGV[12]), tonumber(ARGV[13])

local held, slot = holds_lease(id, worker, attempt)
if not held then
  return {0, 0}
end
local now = now_ms()
local key = PREFIX .. id
local max_retries = max_retries_of(redis.call('HGET', key, 'max_retries'))
add_history(id, attempt, err, worker, now)
redis.call('ZREM', KEYS[1], id)
use_domains(KEYS[8], KEYS[9], KEYS[10])
free_slot(slot, now, false, nil)

local threshold = num(redis.call('HGET', KEYS[7], 'failures'), 0)
if not permanent and threshold > 0 then
  for _, rate_key in ipairs(split_keys(redis.call('HGET', key, 'rate_keys'))) do
    if string.sub(rate_key, 1, 7) == 'domain:' then
      local failures = num(redis.call('HGET', KEYS[5], rate_key), 0) + 1
      redis.call('HSET', KEYS[5], rate_key, failures)
      if failures >= threshold then
        local cooldown = num(redis.call('HGET', KEYS[7], 'cooldown_ms'), 30000)
        redis.call('HSET', KEYS[6], rate_key, now + cooldown)
        emit('rate.paused', now, {request_id = id, key = rate_key, reason = 'circuit_breaker',
          seconds = cooldown / 1000})
      end
    end
  end
end

if permanent or tonumber(attempt) > max_retries then
  redis.call('ZADD', KEYS[3], now, id)
  finish(id, 'failed', nil, err, nil, now, ttl_ms)
  count_up(KEYS[4], 'failed', 1)
  emit('task.failed', now, {request_id = id, worker_id = worker, attempt = tonumber(attempt), error = err})
  return {2, 0}
end

local delay = math.min(backoff_max, backoff * 2 ^ (tonumber(attempt) - 1))
delay = math.floor(math.min(backoff_max, delay * (0.75 + 0.5 * jitter)))
redis.call('HSET', key, 'status', 'retrying', 'ready_at', now + delay)
redis.call('ZADD', KEYS[2], now + delay, id)
count_up(KEYS[4], 'retried', 1)
publish(WAKE, 'in:' .. delay)  -- idle workers wake when it is due
emit('task.retrying', now,
  {request_id = id, worker_id = worker, attempt = tonumber(attempt), error = err, delay = delay / 1000})
return {1, delay}
