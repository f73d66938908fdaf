-- dlq_purge: delete every dead-lettered task and its record.
--
-- KEYS[1] dead  zset id -> time it was dead-lettered
-- KEYS[2] guard never exists: refuses the call while the slot migrates (keys.py)
-- ARGV: only the shared ARGV[1..4] (see _lib.lua)
--
-- Returns the number of tasks deleted.

local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, id in ipairs(ids) do
  redis.call('DEL', PREFIX .. id)
end
redis.call('DEL', KEYS[1])
return #ids
