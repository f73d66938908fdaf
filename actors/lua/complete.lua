-- complete: record the results of one or more tasks leased to one worker.
--
-- KEYS[1] running  zset id -> lease deadline
-- KEYS[2] stats    hash of monotonic counters
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
local codes = {}
local done = 0
for i = 1, n do
  local base = 7 + (i - 1) * 4
  local id, attempt = ARGV[base + 1], ARGV[base + 2]
  if holds_lease(id, worker, attempt) then
    redis.call('ZREM', KEYS[1], id)
    finish(id, 'completed', ARGV[base + 3], nil, ARGV[base + 4], now, ttl_ms)
    emit('task.completed', now, {request_id = id, worker_id = worker, attempt = tonumber(attempt)})
    done = done + 1
    codes[i] = 1
  else
    local f = redis.call('HMGET', PREFIX .. id, 'status', 'worker', 'attempt')
    codes[i] = (f[1] == 'completed' and f[2] == worker and f[3] == attempt) and 1 or 0
  end
end
if done > 0 then
  redis.call('HINCRBY', KEYS[2], 'completed', done)
end
return codes
