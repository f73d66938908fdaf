-- lock: a renewable lease that makes one actor the single active one across
-- all hosts (reaper, governor).
--
-- KEYS[1] <lock>  the lock key (reaper_lock or governor_lock)
-- KEYS[2] guard   never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] owner id
-- ARGV[6] lease in ms
-- ARGV[7] "acquire" (take it if free, renew it if ours) or "release" (free it if ours)
--
-- Returns 1 if the owner holds the lock after the call, else 0.

local owner, lease_ms, mode = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local holder = redis.call('GET', KEYS[1])
if mode == 'release' then
  if holder == owner then
    redis.call('DEL', KEYS[1])
  end
  return 0
end
if holder == owner then
  redis.call('PEXPIRE', KEYS[1], lease_ms)
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], owner, 'PX', lease_ms)
  return 1
end
return 0
