-- repair: put task records that sit in no queue set back where their status says.
--
-- Every state change is one script, so after each one a task's record and
-- the queue sets agree. Agreement can still be broken from outside: a script
-- of an older version that failed half-way (Redis does not roll back), a key
-- deleted by hand, a partial restore. The reaper sweeps the task records a
-- few hundred at a time (SCAN) and hands their ids to this script, which
-- checks and repairs each one atomically:
--   pending   in neither pending nor its rate key's gate -> pending, same score
--   retrying  not in delayed     -> delayed, due now
--   running   not in running     -> running with a lease that ends now: the
--             reaper requeues it as any lost lease (the attempt counts)
--   completed, failed, cancelled with no retention TTL -> the TTL (and a
--             failed one back into the dead-letter set)
--   a request with no status     -> dead-lettered as an invalid record
-- A record whose status is consistent is left alone, so a sweep racing the
-- workers changes nothing: each check here runs between two whole scripts.
--
-- KEYS[1] pending  zset
-- KEYS[2] running  zset id -> lease deadline
-- KEYS[3] delayed  zset id -> due time
-- KEYS[4] dead     zset id -> time dead-lettered
-- KEYS[5] stats    hash of monotonic counters (`repaired` counts repairs)
-- KEYS[6] guard    never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] gate key prefix
-- ARGV[6] result ttl in ms
-- ARGV[7..] request ids
--
-- Returns the ids repaired.

local gate_prefix, ttl_ms = ARGV[5], tonumber(ARGV[6])
local now = now_ms()
local repaired = {}

local function in_set(zset, id)
  return redis.call('ZSCORE', zset, id) ~= false
end

for i = 7, #ARGV do
  local id = ARGV[i]
  local key = PREFIX .. id
  if redis.call('TYPE', key)['ok'] == 'hash' then
    local f = redis.call('HMGET', key, 'status', 'request', 'gate')
    local status, fixed = f[1], false
    local shown = status and string.sub(status, 1, 40) or 'missing'  -- damaged: any length
    if status == 'pending' then
      if not in_set(KEYS[1], id) and not (f[3] and in_set(gate_prefix .. f[3], id)) then
        redis.call('HDEL', key, 'gate')
        redis.call('ZADD', KEYS[1], score_of(id), id)
        fixed = true
      end
    elseif status == 'retrying' then
      if not in_set(KEYS[3], id) then
        redis.call('ZADD', KEYS[3], now, id)
        fixed = true
      end
    elseif status == 'running' then
      if not in_set(KEYS[2], id) then
        redis.call('ZADD', KEYS[2], now, id)
        fixed = true
      end
    elseif status == 'completed' or status == 'failed' or status == 'cancelled' then
      if redis.call('PTTL', key) == -1 then
        if status == 'failed' then
          redis.call('ZADD', KEYS[4], 'NX', now, id)
        end
        redis.call('PEXPIRE', key, ttl_ms)
        fixed = true
      end
    elseif f[2] then
      local err = 'invalid task record: status ' .. (status and ('"' .. shown .. '"') or shown)
      redis.call('ZADD', KEYS[4], now, id)
      finish(id, 'failed', nil, err, nil, now, ttl_ms)
      count_up(KEYS[5], 'failed', 1)
      emit('task.failed', now, {request_id = id, error = err})
      fixed = true
    end
    if fixed then
      repaired[#repaired + 1] = id
      emit('task.repaired', now, {request_id = id, status = shown})
    end
  end
end
if #repaired > 0 then
  count_up(KEYS[5], 'repaired', #repaired)
  publish(WAKE, #repaired)
end
return repaired
