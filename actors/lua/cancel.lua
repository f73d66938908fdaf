-- cancel: stop a task that has not finished.
--
-- KEYS[1] pending  zset
-- KEYS[2] delayed  zset
-- KEYS[3] running  zset
-- KEYS[4] stats    hash of monotonic counters
-- KEYS[5] domains     politeness: per-domain hashes beside this index (a running task's slot is given back)
-- KEYS[6] politeness  hash: the in-flight cap and adaptive settings
-- KEYS[7] gates       zset rate key -> next start (ms)
-- KEYS[8] guard    never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] request id
-- ARGV[6] reason
-- ARGV[7] result ttl in ms
-- ARGV[8] gate key prefix (a pending task may wait in its rate key's gate)
-- ARGV[9] worker id and ARGV[10] attempt: cancel only while this lease is held
--         (a worker reporting its own task cancelled); "" = any (an operator)
--
-- A running task is cancelled at once in Redis; its worker learns it at its
-- next lease renewal (renew reports the lease lost) and its late result is
-- refused by the fencing check.
-- Returns 1 if cancelled, 0 if the task is unknown, already finished, or the
-- lease given is not held.

local id, reason, ttl_ms = ARGV[5], ARGV[6], tonumber(ARGV[7])
local status = redis.call('HGET', PREFIX .. id, 'status')
if status ~= 'pending' and status ~= 'retrying' and status ~= 'running' then
  return 0
end
if ARGV[9] ~= '' and not holds_lease(id, ARGV[9], ARGV[10]) then
  return 0
end
local now = now_ms()
if status == 'running' then
  use_domains(KEYS[5], KEYS[6], KEYS[7])
  free_slot(redis.call('HGET', PREFIX .. id, 'slot'), now, false, nil)
end
redis.call('ZREM', KEYS[1], id)
redis.call('ZREM', KEYS[2], id)
redis.call('ZREM', KEYS[3], id)
local gate = redis.call('HGET', PREFIX .. id, 'gate')
if gate and redis.call('ZREM', ARGV[8] .. gate, id) == 1 then
  count_up(KEYS[4], 'gated', -1)
end
finish(id, 'cancelled', nil, reason, nil, now, ttl_ms)
count_up(KEYS[4], 'cancelled', 1)
emit('task.cancelled', now, {request_id = id, reason = reason})
return 1
