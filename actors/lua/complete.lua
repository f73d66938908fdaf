-- complete: record the results of one or more tasks leased to one worker.
--
-- KEYS[1] running           zset id -> lease deadline
-- KEYS[2] stats             hash of monotonic counters
-- KEYS[3] breaker           hash rate key -> consecutive failures (a success resets its keys)
-- KEYS[4] paused            hash rate key -> paused until (a successful breaker probe resumes)
-- KEYS[5] breaker_settings  hash: failures (threshold)
-- KEYS[6] gates             zset rate key -> next start (ms): a resumed key's gate is due now
-- KEYS[7] domains           politeness: per-domain hashes beside this index (a completed task's slot
--                           is given back; its domain's window and learned rate grow)
-- KEYS[8] politeness        hash: the in-flight cap and adaptive settings
-- KEYS[9] limits            hash rate key -> tasks/s (the ceiling of a learned rate)
-- KEYS[10] guard            never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] worker id
-- ARGV[6] result ttl in ms
-- ARGV[7] number of results n, then n groups of 4:
--         request_id, attempt (fencing token), data_json, execution_time (s)
--
-- Returns one code per result: 1 completed (or already completed by this
-- very lease: a client retry after a lost reply), 0 refused (lease not held:
-- the attempt was taken over or cancelled).

local worker, ttl_ms, n = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local now = now_ms()
use_domains(KEYS[7], KEYS[8], KEYS[6])
local breaker_open = redis.call('EXISTS', KEYS[3]) == 1
local threshold = breaker_open and num(redis.call('HGET', KEYS[5], 'failures'), 0) or 0
local resumed = false
local codes = {}
local done = 0
for i = 1, n do
  local base = 7 + (i - 1) * 4
  local id, attempt = ARGV[base + 1], ARGV[base + 2]
  local held, slot = holds_lease(id, worker, attempt)
  if held then
    redis.call('ZREM', KEYS[1], id)
    free_slot(slot, now, true, KEYS[9])
    if breaker_open then
      for _, key in ipairs(split_keys(redis.call('HGET', PREFIX .. id, 'rate_keys'))) do
        local failures = num(redis.call('HGET', KEYS[3], key), 0)
        if failures > 0 then
          redis.call('HDEL', KEYS[3], key)
          if threshold > 0 and failures >= threshold then
            redis.call('HDEL', KEYS[4], key)  -- the probe succeeded: resume the key
            redis.call('ZADD', KEYS[6], 'XX', 'LT', now, key)
            resumed = true
          end
        end
      end
    end
    finish(id, 'completed', ARGV[base + 3], nil, ARGV[base + 4], now, ttl_ms)
    emit_task('task.completed', now, id, worker, tonumber(attempt))
    done = done + 1
    codes[i] = 1
  else
    local f = redis.call('HMGET', PREFIX .. id, 'status', 'worker', 'attempt')
    codes[i] = (f[1] == 'completed' and f[2] == worker and f[3] == attempt) and 1 or 0
  end
end
if done > 0 then
  count_up(KEYS[2], 'completed', done)
end
if resumed then
  publish(WAKE, 1)
end
return codes
