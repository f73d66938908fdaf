-- Shared preamble, prepended to every script by actors/store.py.
--
-- Every script receives the same first four ARGV:
--   ARGV[1] task key prefix: a task's hash is PREFIX .. id. The prefix holds
--           the queue's {hash tag}, so keys built from it stay in the slot of
--           the KEYS the script was given (Redis Cluster safe).
--   ARGV[2] events channel (JSON events for live views)
--   ARGV[3] done channel prefix: DONE .. id carries a task's final response
--   ARGV[4] wake channel: told whenever tasks become claimable
-- Script-specific arguments start at ARGV[5].

local PREFIX, EVENTS, DONE, WAKE = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function emit(name, now, fields)
  fields.event = name
  fields.ts = now / 1000
  redis.call('PUBLISH', EVENTS, cjson.encode(fields))
end

-- Put a task in a terminal state (completed, failed, cancelled): store its
-- response, start its retention clock and hand the response to any waiter.
-- data_json is raw JSON (already validated by the client) or nil.
local function finish(id, status, data_json, err, exec_time, now, ttl_ms)
  local key = PREFIX .. id
  local response = '{"request_id":' .. cjson.encode(id)
    .. ',"status":"' .. status .. '"'
    .. ',"data":' .. (data_json or 'null')
    .. ',"error":' .. (err and cjson.encode(err) or 'null')
    .. ',"execution_time":' .. (exec_time or 'null')
    .. ',"completed_at":' .. string.format('%.3f', now / 1000) .. '}'
  redis.call('HSET', key, 'status', status, 'response', response, 'finished_at', now)
  redis.call('PEXPIRE', key, ttl_ms)
  redis.call('PUBLISH', DONE .. id, response)
end

-- The fencing check: a report counts only from the worker that holds the
-- task's current attempt. A worker whose lease expired and was taken over
-- (or whose task was cancelled) is refused.
local function holds_lease(id, worker, attempt)
  local f = redis.call('HMGET', PREFIX .. id, 'status', 'worker', 'attempt')
  return f[1] == 'running' and f[2] == worker and f[3] == attempt
end
