-- history: switch the event history on or off, and trim it (the reaper, each pass).
--
-- KEYS[1] history  the stream; the scripts derive it (and its count, HISTORY_COUNT)
--                  from the events channel (_lib.lua), and so does this one: KEYS[1]
--                  is passed so that a Redis Cluster routes the call to its node
-- KEYS[2] guard    never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] events kept at most (0 = history off: the stream is deleted)
-- ARGV[6] entries older than this many ms are dropped (0 = no age limit)
--
-- The history is the stream HISTORY (BASE .. 'events:history', see _lib.lua),
-- each entry the events of one script call (`n` of them); HISTORY_COUNT
-- counts the events it holds. Its existence is what makes the scripts keep
-- events, so this script creates it (empty) when history is on. Trimming
-- walks from the oldest entry and drops whole entries while the stream holds
-- more events than allowed or the entry is too old; at most MAX_WALK entries
-- a call (the reaper calls again in half a second).
-- Returns the number of events left.

local limit, max_age_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
local MAX_WALK, PAGE = 20000, 500
if limit <= 0 then
  redis.call('DEL', HISTORY, HISTORY_COUNT)
  return 0
end
if redis.call('EXISTS', HISTORY) == 0 or redis.call('TYPE', HISTORY).ok ~= 'stream' then
  redis.call('DEL', HISTORY, HISTORY_COUNT)  -- a key of another type written from outside
  redis.call('XADD', HISTORY, '*', 'n', 0, 'e', '[]')
  redis.call('XTRIM', HISTORY, 'MAXLEN', 0)  -- an empty stream stays
end

local function events_of(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'n' then
      return tonumber(fields[i + 1]) or 1
    end
  end
  return 1
end

-- The count, recounted when it is missing or damaged (a stream written before it).
local total = tonumber(redis.call('GET', HISTORY_COUNT) or '')
if not total or total < 0 then
  total = 0
  for _, entry in ipairs(redis.call('XRANGE', HISTORY, '-', '+')) do
    total = total + events_of(entry[2])
  end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = max_age_ms > 0 and now - max_age_ms or -1
local dropped, keep_from, walked, start = 0, nil, 0, '-'
while not keep_from and walked < MAX_WALK do
  local page = redis.call('XRANGE', HISTORY, start, '+', 'COUNT', PAGE)
  if #page == 0 then
    break
  end
  for _, entry in ipairs(page) do
    local ms = tonumber(string.match(entry[1], '^(%d+)')) or 0
    if total - dropped > limit or ms < cutoff then
      dropped = dropped + events_of(entry[2])
    else
      keep_from = entry[1]
      break
    end
  end
  walked = walked + #page
  start = '(' .. page[#page][1]
end
if not keep_from and dropped > 0 then
  -- The walk stopped (its limit, or the stream's end) with every entry so far
  -- to go: keep from the next one, if any.
  local next_entry = redis.call('XRANGE', HISTORY, start, '+', 'COUNT', 1)[1]
  if next_entry then
    keep_from = next_entry[1]
  else
    redis.call('XTRIM', HISTORY, 'MAXLEN', 0)
  end
end
if keep_from then
  redis.call('XTRIM', HISTORY, 'MINID', keep_from)
end
total = math.max(0, total - dropped)
redis.call('SET', HISTORY_COUNT, total)
return total
