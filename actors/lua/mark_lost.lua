-- mark_lost: mark workers whose heartbeat stopped as inactive.
--
-- KEYS[1] workers  zset worker id -> last heartbeat (ms)
-- KEYS[2] guard    never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] heartbeat timeout in ms
-- ARGV[6] worker key prefix: a worker's hash is ARGV[6] .. worker id
--
-- The status flip is the guard: however many heartbeat actors (one per host)
-- run this at once, each loss is reported once.
-- Returns the ids of the workers newly marked lost.

local now = now_ms()
local lost = {}
for _, worker in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[5]))) do
  local key = ARGV[6] .. worker
  if redis.call('HGET', key, 'status') == 'active' then
    redis.call('HSET', key, 'status', 'inactive')
    emit('worker.lost', now, {worker_id = worker})
    lost[#lost + 1] = worker
  end
end
return lost
