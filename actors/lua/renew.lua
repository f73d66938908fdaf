-- renew: extend the leases a worker holds while its tasks run.
--
-- KEYS[1] running  zset id -> lease deadline
-- KEYS[2] guard    never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] worker id
-- ARGV[6] lease in ms
-- ARGV[7] number of leases n, then n pairs: request_id, attempt
--
-- Returns the ids whose lease is no longer held (taken over after expiry,
-- or cancelled); the worker stops those tasks and discards their results.

local worker, lease_ms, n = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local deadline = now_ms() + lease_ms
local lost = {}
for i = 1, n do
  local id, attempt = ARGV[7 + 2 * i - 1], ARGV[7 + 2 * i]
  if holds_lease(id, worker, attempt) then
    redis.call('ZADD', KEYS[1], 'XX', deadline, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
