-- record_metrics: add up a worker's latency and outcome counts (about once a second).
--
-- KEYS[1] metrics  hash, since the queue was created: w|S|i and e|S|i (tasks of
--                  script S whose queue wait / execution fell in bucket i),
--                  w|S|sum and e|S|sum (µs), o|S|outcome (actors/telemetry.py)
-- KEYS[2] guard    never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] n, then n pairs: a field of KEYS[1], the count to add
-- then    m, then m pairs: a field of this minute's hash (w<i>, e<i>,
--         started, completed, failed, retried), the count to add
--
-- The minute is Redis's own (ms // 60000), as for the governor's depth
-- (backpressure.lua): every host counts into the same minute. Its hash is
-- kept MINUTES_KEPT_MS. A damaged counter starts again (count_up).
-- Returns the number of fields written.

local n = tonumber(ARGV[5])
for i = 1, n do
  count_up(KEYS[1], ARGV[4 + 2 * i], tonumber(ARGV[5 + 2 * i]) or 0)
end
local base = 6 + 2 * n
local m = tonumber(ARGV[base])
if m > 0 then
  local minute = BASE .. 'metrics:' .. math.floor(now_ms() / 60000)
  for i = 1, m do
    count_up(minute, ARGV[base + 2 * i - 1], tonumber(ARGV[base + 2 * i]) or 0)
  end
  redis.pcall('PEXPIRE', minute, MINUTES_KEPT_MS)  -- after writes: never abort
end
return n + m
