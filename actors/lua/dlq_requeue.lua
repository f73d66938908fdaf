-- dlq_requeue: give dead-lettered tasks a fresh set of attempts.
--
-- KEYS[1] dead     zset id -> time it was dead-lettered
-- KEYS[2] pending  zset
-- KEYS[3] stats    hash of monotonic counters (`gated`: pending tasks in gates)
-- KEYS[4] guard    never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] high watermark: requeued tasks may not take the queue's depth
--         (pending + gated) past it, as no enqueue may
-- ARGV[6] "all" followed by ARGV[7], the most to requeue in this call (the
--         oldest dead letters first: a call stays short whatever the DLQ holds),
--         or "ids" followed by the request ids from ARGV[7] on
--
-- The task keeps its request, its place (score) and its failure history;
-- its attempt count restarts at 0 and its retention TTL is removed.
-- Returns {requeued, full, taken}: full is 1 when the high watermark stopped
-- the call (the rest stay dead letters), else 0; taken counts the ids taken
-- off the dead-letter set (0: nothing was left to take).

local high = tonumber(ARGV[5])
local ids
if ARGV[6] == 'all' then
  ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[7]) - 1)
else
  ids = {}
  for i = 7, #ARGV do
    ids[#ids + 1] = ARGV[i]
  end
end
local depth = redis.call('ZCARD', KEYS[2]) + num(redis.call('HGET', KEYS[3], 'gated'), 0)
local now = now_ms()
local requeued, full, taken = 0, 0, 0
for _, id in ipairs(ids) do
  if depth + requeued >= high then
    full = 1
    break
  end
  local key = PREFIX .. id
  local was_dead = redis.call('ZREM', KEYS[1], id) == 1
  if was_dead then
    taken = taken + 1
  end
  if was_dead and redis.call('HGET', key, 'status') == 'failed' then
    redis.call('PERSIST', key)
    redis.call('HSET', key, 'status', 'pending', 'attempt', 0, 'ready_at', now)
    redis.call('HDEL', key, 'response', 'finished_at', 'worker')
    redis.call('ZADD', KEYS[2], score_of(id), id)
    emit('task.enqueued', now, {request_id = id, reason = 'dlq_retry'})
    requeued = requeued + 1
  end
end
if requeued > 0 then
  publish(WAKE, requeued)
end
return {requeued, full, taken}
