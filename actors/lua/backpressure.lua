-- backpressure: the governor publishes the queue's admission state.
--
-- KEYS[1] backpressure  hash: state, depth, rate (admitted enqueues/s while
--                       throttled), drain (tasks started/s), updated_at (ms)
-- KEYS[2] guard         never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] state: open | throttled | closed
-- ARGV[6] depth (pending + gated)
-- ARGV[7] admitted rate (tasks/s)
-- ARGV[8] drain rate (tasks/s)
-- ARGV[9] 1: the queue's home partition (partition 0); 0: another partition
--
-- A change of state publishes backpressure.changed. The depth (of the whole
-- queue) is also kept as the minute's `depth` (the dashboard's depth over the
-- last hour; _lib.lua). Both only in the home partition: the governor tells
-- every partition, the queue changed state once.
-- Returns the previous state ("" if none was published).

local state = ARGV[5]
local now = now_ms()
local previous = redis.call('HGET', KEYS[1], 'state') or ''
redis.call('HSET', KEYS[1], 'state', state, 'depth', ARGV[6], 'rate', ARGV[7],
  'drain', ARGV[8], 'updated_at', now)
local home = ARGV[9] == '1'
if home then
  local minute = BASE .. 'metrics:' .. math.floor(now / 60000)
  redis.pcall('HSET', minute, 'depth', ARGV[6])
  redis.pcall('PEXPIRE', minute, MINUTES_KEPT_MS)
end
if previous ~= state then
  if state == 'throttled' then
    redis.call('HDEL', KEYS[1], 'tokens', 'tokens_at')  -- a fresh bucket
  end
end
if previous ~= state and home then
  emit('backpressure.changed', now,
    {state = state, previous = previous, depth = tonumber(ARGV[6]), rate = tonumber(ARGV[7])})
end
return previous
