-- probe: which of the commands scrapeq needs does this ACL user lack?
--
-- KEYS[1] stats  unused: passed so that a Redis Cluster routes the call to the
--                queue's node (the probe keys are built from the task prefix, in
--                the queue's slot)
-- KEYS[2] guard  never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5..] the command names to try. Each runs through redis.pcall with
-- harmless arguments on probe keys nobody else uses (in the queue's slot,
-- they expire within a second and are deleted at the end) and on a probe
-- channel; an ACL refusal (NOPERM, or "no permissions") marks the command.
-- Other errors (a wrong type, say) do not: the right is there.
-- Returns the names refused, in the order given; empty when every one runs.

local hash, zset, plain = PREFIX .. '~probe:h', PREFIX .. '~probe:z', PREFIX .. '~probe:s'
local stream = PREFIX .. '~probe:x'
local channel = EVENTS .. ':probe'

local TRIES = {
  DEL = {'DEL', plain}, EXISTS = {'EXISTS', plain}, GET = {'GET', plain},
  SET = {'SET', plain, '1', 'PX', 1000}, TYPE = {'TYPE', plain}, INCRBY = {'INCRBY', plain, 0},
  PTTL = {'PTTL', plain}, PEXPIRE = {'PEXPIRE', plain, 1000}, PERSIST = {'PERSIST', plain},
  HSET = {'HSET', hash, 'f', '1'}, HSETNX = {'HSETNX', hash, 'f', '1'}, HGET = {'HGET', hash, 'f'},
  HMGET = {'HMGET', hash, 'f'}, HGETALL = {'HGETALL', hash}, HDEL = {'HDEL', hash, 'f'},
  HEXISTS = {'HEXISTS', hash, 'f'}, HINCRBY = {'HINCRBY', hash, 'n', 0},
  ZADD = {'ZADD', zset, 0, 'm'}, ZCARD = {'ZCARD', zset}, ZRANGE = {'ZRANGE', zset, 0, 0},
  ZRANGEBYSCORE = {'ZRANGEBYSCORE', zset, 0, 0}, ZSCORE = {'ZSCORE', zset, 'm'},
  ZREM = {'ZREM', zset, 'm'}, ZPOPMIN = {'ZPOPMIN', zset},
  PUBLISH = {'PUBLISH', channel, 'probe'}, ['PUBSUB|NUMSUB'] = {'PUBSUB', 'NUMSUB', channel},
  ['PUBSUB|NUMPAT'] = {'PUBSUB', 'NUMPAT'}, TIME = {'TIME'},
  SCAN = {'SCAN', 0, 'MATCH', hash, 'COUNT', 1},
  XADD = {'XADD', stream, 'MAXLEN', 0, '*', 'f', '1'}, XTRIM = {'XTRIM', stream, 'MAXLEN', 0},
  XRANGE = {'XRANGE', stream, '-', '+', 'COUNT', 1},
  XREVRANGE = {'XREVRANGE', stream, '+', '-', 'COUNT', 1},
}

local function refused(result)
  if type(result) ~= 'table' or not result.err then
    return false
  end
  local text = string.lower(result.err)
  return string.find(text, 'noperm', 1, true) ~= nil
    or string.find(text, 'no permission', 1, true) ~= nil
    or string.find(text, "can't run this command", 1, true) ~= nil
    or string.find(text, "can't publish", 1, true) ~= nil
end

local missing = {}
for i = 5, #ARGV do
  local try = TRIES[ARGV[i]]
  if try == nil or refused(redis.pcall(unpack(try))) then
    missing[#missing + 1] = ARGV[i]
  end
end
for _, key in ipairs({hash, zset, stream}) do
  redis.pcall('PEXPIRE', key, 1000)
end
redis.pcall('DEL', hash, zset, plain, stream)
return missing
