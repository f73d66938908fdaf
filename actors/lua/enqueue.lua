-- enqueue: add one or more tasks to the pending queue, all or nothing.
--
-- KEYS[1] pending   zset id -> score (-priority * 1e12 + sequence): ZPOPMIN
--                   yields the highest priority first, FIFO within one
-- KEYS[2] seq       string, the FIFO sequence counter
-- KEYS[3] stats     hash of monotonic counters
-- ARGV[5] number of tasks n, then n groups of 5:
--         request_id, request_json, priority, max_retries, expires_in_ms (0 = never)
--
-- Returns {code, n}
--   {1, written}: every task is stored; a task whose id already holds the
--                 very same request counts as stored, so a client retry after
--                 a lost reply is harmless (written counts only new ones)
--   {0, index}:   task number `index` (1-based) reuses an existing id with a
--                 different request; nothing was written

local n = tonumber(ARGV[5])
local now = now_ms()

local fresh = {}
for i = 1, n do
  local base = 5 + (i - 1) * 5
  local existing = redis.call('HGET', PREFIX .. ARGV[base + 1], 'request')
  if existing then
    if existing ~= ARGV[base + 2] then
      return {0, i}
    end
  else
    fresh[#fresh + 1] = base
  end
end

for _, base in ipairs(fresh) do
  local id = ARGV[base + 1]
  local score = -tonumber(ARGV[base + 3]) * 1e12 + redis.call('INCR', KEYS[2])
  local key = PREFIX .. id
  redis.call('HSET', key, 'status', 'pending', 'request', ARGV[base + 2], 'score', score,
    'attempt', 0, 'max_retries', ARGV[base + 4], 'enqueued_at', now)
  local expires_in = tonumber(ARGV[base + 5])
  if expires_in > 0 then
    redis.call('HSET', key, 'expires_at', now + expires_in)
  end
  redis.call('ZADD', KEYS[1], score, id)
  emit('task.enqueued', now, {request_id = id})
end

if #fresh > 0 then
  redis.call('HINCRBY', KEYS[3], 'enqueued', #fresh)
  redis.call('PUBLISH', WAKE, #fresh)
end
return {1, #fresh}
