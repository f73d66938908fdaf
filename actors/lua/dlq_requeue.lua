-- dlq_requeue: give dead-lettered tasks a fresh set of attempts.
--
-- KEYS[1] dead     zset id -> time it was dead-lettered
-- KEYS[2] pending  zset
-- ARGV[5] "all", or "ids" followed by the request ids from ARGV[6] on
--
-- The task keeps its request, its place (score) and its failure history;
-- its attempt count restarts at 0 and its retention TTL is removed.
-- Returns the number of tasks requeued.

local ids
if ARGV[5] == 'all' then
  ids = redis.call('ZRANGE', KEYS[1], 0, -1)
else
  ids = {}
  for i = 6, #ARGV do
    ids[#ids + 1] = ARGV[i]
  end
end
local now = now_ms()
local requeued = 0
for _, id in ipairs(ids) do
  local key = PREFIX .. id
  if redis.call('ZREM', KEYS[1], id) == 1 and redis.call('HGET', key, 'status') == 'failed' then
    redis.call('PERSIST', key)
    redis.call('HSET', key, 'status', 'pending', 'attempt', 0)
    redis.call('HDEL', key, 'response', 'finished_at', 'worker')
    redis.call('ZADD', KEYS[2], score_of(id), id)
    emit('task.enqueued', now, {request_id = id, reason = 'dlq_retry'})
    requeued = requeued + 1
  end
end
if requeued > 0 then
  publish(WAKE, requeued)
end
return requeued
