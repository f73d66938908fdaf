-- promote: move retries whose backoff is over back to pending.
--
-- KEYS[1] pending  zset id -> priority/FIFO score
-- KEYS[2] delayed  zset id -> due time (ms, Redis clock)
-- KEYS[3] guard    never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] at most this many due retries are promoted per call
--
-- Each due task goes back to pending at its stored queue score, status
-- `pending` (the promote_due helper in _lib.lua, which claim runs too: a
-- worker promotes before it claims). The reaper runs this on its own so that
-- due retries reach pending even while no worker claims.
-- Returns the number of tasks promoted.

return promote_due(KEYS[1], KEYS[2], tonumber(ARGV[5]), now_ms())
