-- heartbeat: register a worker or record that it is alive, on the Redis clock.
--
-- KEYS[1] workers   zset worker id -> last heartbeat (ms)
-- KEYS[2] <worker>  the worker's hash (worker key prefix .. ARGV[5])
-- KEYS[3] guard     never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] worker id
-- ARGV[6] "register" (publishes worker.registered) or "beat"
-- ARGV[7] number of extra fields n, then n field/value pairs (pid, host,
--         tasks_processed, cpu_percent, rss_bytes, ...)
--
-- Returns the heartbeat time (ms).

local worker, mode, n = ARGV[5], ARGV[6], tonumber(ARGV[7])
local now = now_ms()
redis.call('ZADD', KEYS[1], now, worker)
redis.call('HSET', KEYS[2], 'worker_id', worker, 'status', 'active', 'last_heartbeat', now)
if mode == 'register' then
  redis.call('HSET', KEYS[2], 'registered_at', now)
  redis.call('HSETNX', KEYS[2], 'tasks_processed', 0)
end
for i = 1, n do
  redis.call('HSET', KEYS[2], ARGV[7 + 2 * i - 1], ARGV[7 + 2 * i])
end
if mode == 'register' then
  emit('worker.registered', now, {worker_id = worker})
end
return now
