-- history: switch the event history on or off, and trim it (the reaper, each pass).
--
-- ARGV[5] events kept at most (entries of the stream; 0 = history off: it is deleted)
-- ARGV[6] entries older than this many ms are dropped (0 = no age limit)
--
-- The history is the stream EVENTS .. ':history' (see _lib.lua): its existence
-- is what makes the scripts keep events, so this script creates it (empty)
-- when history is on. Trimming is exact: it runs every reaper pass, so each
-- pass removes only what the last half second added.
-- Returns the number of entries left.

local count, max_age_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
if count <= 0 then
  redis.call('DEL', HISTORY)
  return 0
end
if redis.call('EXISTS', HISTORY) == 0 or redis.call('TYPE', HISTORY).ok ~= 'stream' then
  redis.call('DEL', HISTORY)  -- a key of another type written from outside
  redis.call('XADD', HISTORY, '*', 'e', '[]')
  redis.call('XTRIM', HISTORY, 'MAXLEN', 0)  -- an empty stream stays
end
redis.call('XTRIM', HISTORY, 'MAXLEN', count)
if max_age_ms > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('XTRIM', HISTORY, 'MINID', now - max_age_ms)
end
return redis.call('XLEN', HISTORY)
