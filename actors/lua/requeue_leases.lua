-- requeue_leases: take back tasks whose worker is gone.
--
-- KEYS[1] running  zset id -> lease deadline
-- KEYS[2] pending  zset id -> priority/FIFO score
-- KEYS[3] dead     zset id -> time it was dead-lettered
-- KEYS[4] stats    hash of monotonic counters
-- KEYS[5] domains     politeness: per-domain hashes beside this index (a taken-back task's slot is given back)
-- KEYS[6] politeness  hash: the in-flight cap and adaptive settings
-- KEYS[7] gates       zset rate key -> next start (ms)
-- KEYS[8] guard    never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] selector: "expired" (leases past their deadline, by the Redis
--         clock) or "worker" (every lease of the worker named in ARGV[6],
--         which its supervisor saw die: no need to wait for expiry)
-- ARGV[6] worker id (selector "worker") or the most leases to take (selector "expired")
-- ARGV[7] result ttl in ms
--
-- The lost attempt counts toward max_retries (and joins the task's history),
-- so a poison task that kills its worker every time ends in the dead-letter queue.
-- Returns {requeued, dead_lettered}.

local selector, ttl_ms = ARGV[5], tonumber(ARGV[7])
local now = now_ms()
use_domains(KEYS[5], KEYS[6], KEYS[7])
local ids = {}
if selector == 'expired' then
  ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[6]))
else
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if redis.call('HGET', PREFIX .. id, 'worker') == ARGV[6] then
      ids[#ids + 1] = id
    end
  end
end

local requeued, dead = 0, 0
for _, id in ipairs(ids) do
  local key = PREFIX .. id
  redis.call('ZREM', KEYS[1], id)
  local f = redis.call('HMGET', key, 'status', 'attempt', 'max_retries', 'worker', 'score', 'slot')
  if f[1] == 'running' then
    free_slot(f[6], now, false, nil)
    local err = 'worker lost: lease of attempt ' .. tostring(f[2]) .. ' was not renewed'
    add_history(id, f[2], err, f[4] or '', now)
    if (tonumber(f[2]) or 0) > max_retries_of(f[3]) then
      redis.call('ZADD', KEYS[3], now, id)
      finish(id, 'failed', nil, err, nil, now, ttl_ms)
      count_up(KEYS[4], 'failed', 1)
      emit('task.failed', now, {request_id = id, worker_id = f[4], attempt = tonumber(f[2]), error = err})
      dead = dead + 1
    else
      redis.call('HSET', key, 'status', 'pending', 'ready_at', now)
      redis.call('HDEL', key, 'worker')
      redis.call('ZADD', KEYS[2], tonumber(f[5]) or 0, id)
      emit('task.requeued', now, {request_id = id, worker_id = f[4], reason = 'lease_expired'})
      requeued = requeued + 1
    end
  end
end
if requeued > 0 then
  count_up(KEYS[4], 'requeued', requeued)
  publish(WAKE, requeued)
end
return {requeued, dead}
