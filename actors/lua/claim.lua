-- claim: promote due retries, then lease up to `count` tasks to one worker.
--
-- KEYS[1] pending  zset id -> priority/FIFO score
-- KEYS[2] running  zset id -> lease deadline (ms, Redis clock)
-- KEYS[3] delayed  zset id -> due time (ms, Redis clock)
-- KEYS[4] stats    hash of monotonic counters
-- ARGV[5] worker id
-- ARGV[6] count: tasks to claim (0 = only promote; the reaper does that)
-- ARGV[7] lease in ms
-- ARGV[8] at most this many due retries are promoted per call
-- ARGV[9] result ttl in ms (a task past its expires_at is cancelled here)
--
-- Each claimed task gets attempt + 1: the attempt is the lease's fencing
-- token, checked by complete, fail, renew and release.
-- Returns {wait_ms, id, attempt, request_json, id, attempt, request_json, ...}
--   wait_ms: ms until the next retry is due (-1 if none); lets an idle
--   worker sleep exactly that long instead of polling.

local worker, count = ARGV[5], tonumber(ARGV[6])
local lease_ms, promote_limit, ttl_ms = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local now = now_ms()

local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, promote_limit)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZADD', KEYS[1], redis.call('HGET', PREFIX .. id, 'score'), id)
  redis.call('HSET', PREFIX .. id, 'status', 'pending')
end

local out = {-1}
local claimed = 0
while claimed < count do
  local popped = redis.call('ZPOPMIN', KEYS[1], count - claimed)
  if #popped == 0 then
    break
  end
  for i = 1, #popped, 2 do
    local id = popped[i]
    local key = PREFIX .. id
    local fields = redis.call('HMGET', key, 'request', 'expires_at')
    if not fields[1] then
      -- the record is gone (purged by an operator): nothing to run
    elseif fields[2] and tonumber(fields[2]) <= now then
      finish(id, 'cancelled', nil, 'expired', nil, now, ttl_ms)
      redis.call('HINCRBY', KEYS[4], 'cancelled', 1)
      emit('task.cancelled', now, {request_id = id, reason = 'expired'})
    else
      local attempt = redis.call('HINCRBY', key, 'attempt', 1)
      redis.call('HSET', key, 'status', 'running', 'worker', worker, 'started_at', now)
      redis.call('ZADD', KEYS[2], now + lease_ms, id)
      emit('task.started', now, {request_id = id, worker_id = worker, attempt = attempt})
      out[#out + 1] = id
      out[#out + 1] = attempt
      out[#out + 1] = fields[1]
      claimed = claimed + 1
    end
  end
end

if claimed < count then
  local next_due = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if #next_due > 0 then
    out[1] = math.max(0, tonumber(next_due[2]) - now)
  end
end
return out
