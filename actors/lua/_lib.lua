-- Shared preamble, prepended to every script by actors/store.py.
--
-- Every script receives the same first four ARGV:
--   ARGV[1] task key prefix: a task's hash is PREFIX .. id. The prefix holds
--           the queue's {hash tag}, so keys built from it stay in the slot of
--           the KEYS the script was given (Redis Cluster safe).
--   ARGV[2] events channel (JSON events for live views); a leading '{' asks
--           for every event to be published (see events_wanted)
--   ARGV[3] done channel prefix: DONE .. id carries a task's final response
--   ARGV[4] wake channel: told whenever tasks become claimable (a number),
--           or will be in N ms ("in:N", a retry's backoff)
-- Script-specific arguments start at ARGV[5].

local PREFIX, EVENTS, DONE, WAKE = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
-- The keys of this partition are BASE .. name (KeySpace.base: PREFIX is BASE .. 'task:').
-- The channels EVENTS and DONE are the queue's, shared by all its partitions.
local BASE = string.sub(PREFIX, 1, #PREFIX - #'task:')
-- An events channel marked with a leading '{' (KeySpace.script_context): the
-- queue is on a Redis Cluster, where a node counts only its own subscribers.
-- Listeners there announce themselves instead, in every partition
-- (BASE .. 'listeners', a key they renew; actors/listeners.py).
local events_on_cluster = string.byte(EVENTS, 1) == 123  -- '{'
if events_on_cluster then
  EVENTS = string.sub(EVENTS, 2)
end

-- ScrapingRequest's default max_retries (a test keeps the two equal). A task
-- record leaves the field out at this value: a pending task stays in a
-- smaller jemalloc size class (see docs/benchmarks.md, memory per task).
local DEFAULT_MAX_RETRIES = 3

-- A task's max_retries from its record's raw field (false: the default). A
-- damaged value counts as 0: the task is not retried rather than stuck.
local function max_retries_of(raw)
  if raw == false then
    return DEFAULT_MAX_RETRIES
  end
  return tonumber(raw) or 0
end

-- Redis does not roll a script back: a script that fails after its first
-- write leaves the writes before the failure in place (a task record in no
-- queue set, say). So after its first write a script must not fail. The three
-- helpers below are how: a number read from Redis is converted with a default
-- (a damaged value never turns into a nil that arithmetic trips on), and
-- publishing and counting never raise (an ACL user without channel rights, a
-- counter damaged from outside). A script that can fail otherwise does every
-- read and check that could raise before its first write.

-- A number read from Redis, or `default` when it is missing or not a number.
local function num(raw, default)
  return tonumber(raw) or default
end

-- PUBLISH that never aborts the script: a refusal (an ACL user without
-- rights on the channel: Redis 7 gives a new user none) loses only the
-- message, never the state change it announces.
local function publish(channel, message)
  redis.pcall('PUBLISH', channel, message)
end

-- HINCRBY of a counter that never aborts the script: a counter damaged from
-- outside (not an integer) starts again at `by`.
local function count_up(hash, field, by)
  local result = redis.pcall('HINCRBY', hash, field, by)
  if type(result) == 'table' then
    redis.pcall('HSET', hash, field, by)
  end
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Whether to publish the next event of this script call. Redis drops a
-- message nobody is subscribed to, so a call that has many to send (a batch
-- of claims, completions or enqueues) asks once, at its second event,
-- whether anyone listens on this server (on the channel, or on any pattern)
-- and skips encoding and publishing the rest if not: ~20% of Redis's work
-- per task in the workers. The first event is published without asking,
-- which costs less than the question. Subscribe on the server the scripts
-- run on: a subscriber on a replica alone hears only first events.
local events_asked, events_heard = 0, true
local function events_wanted()
  events_asked = events_asked + 1
  if events_on_cluster then
    if events_asked == 1 then
      -- A cluster forwards every PUBLISH to every master: asked at the first event.
      local listening = redis.pcall('EXISTS', BASE .. 'listeners')
      events_heard = type(listening) ~= 'number' or listening == 1
    end
  elseif events_asked == 2 then
    -- A refused question (ACL) counts as "someone listens": publish() decides.
    local subscribers = redis.pcall('PUBSUB', 'NUMSUB', EVENTS)
    local patterns = redis.pcall('PUBSUB', 'NUMPAT')
    events_heard = type(patterns) ~= 'number' or patterns > 0
      or type(subscribers[2]) ~= 'number' or subscribers[2] > 0
  end
  return events_heard
end

-- Event history (docs/events.md): besides pub/sub, the events of one script
-- call are kept as one entry of a stream, BASE .. 'events:history' (field `e`:
-- one event's JSON, or a JSON array of them, in order; field `n`: how many
-- events), written in the same script as the change they announce. One
-- entry per call, not per event: a claim or completion of 50 tasks costs one
-- XADD. HISTORY_COUNT counts the events the stream holds, so the reaper can
-- trim it to `[events] history` events and by age (history.lua). The
-- stream's existence is the switch: `supervisor start` creates it when
-- `history` > 0. store.py wraps every script so that save_history() runs
-- when it returns.
local HISTORY = BASE .. 'events:history'
local HISTORY_COUNT = HISTORY .. ':count'
local history_on = nil
local history = {}

local function history_kept()
  if history_on == nil then
    history_on = redis.call('EXISTS', HISTORY) == 1
  end
  return history_on
end

-- Keep an event's JSON text for this call's history entry.
local function keep(text)
  if history_kept() then
    history[#history + 1] = text
  end
end

-- The per-task events a call sends many of (task.started in a claim,
-- task.completed in a completion) are kept as one object per call and name:
-- {"event", "ts", "worker_id", "request_ids": [...], "attempts": [...]},
-- which readers expand into one event per task (actors/history.py): per task
-- it costs a table insert, not a JSON encoding (W1 measured 0.88x without).
-- Pub/sub still gets one message per event. Ids match REQUEST_ID_PATTERN:
-- they need no JSON escaping.
local task_batches, task_batch_names = {}, {}

local function emit_task(name, now, id, worker, attempt)
  if events_wanted() then
    publish(EVENTS, cjson.encode(
      {event = name, ts = now / 1000, request_id = id, worker_id = worker, attempt = attempt}))
  end
  if history_kept() then
    local batch = task_batches[name]
    if not batch then
      batch = {ts = now / 1000, worker = worker, ids = {}, attempts = {}}
      task_batches[name] = batch
      task_batch_names[#task_batch_names + 1] = name
    end
    batch.ids[#batch.ids + 1] = id
    batch.attempts[#batch.attempts + 1] = attempt
  end
end

local function save_history()
  local events = #history
  for _, name in ipairs(task_batch_names) do
    local batch = task_batches[name]
    events = events + #batch.ids
    history[#history + 1] = '{"event":"' .. name .. '","ts":' .. batch.ts
      .. ',"worker_id":' .. cjson.encode(batch.worker)
      .. ',"request_ids":["' .. table.concat(batch.ids, '","')
      .. '"],"attempts":[' .. table.concat(batch.attempts, ',') .. ']}'
  end
  task_batches, task_batch_names = {}, {}
  if #history > 0 then
    local text = #history == 1 and history[1] or '[' .. table.concat(history, ',') .. ']'
    -- Never abort: history only. Counted only when kept (a refused XADD, at
    -- maxmemory say, must not make the count claim events that are not there).
    if type(redis.pcall('XADD', HISTORY, '*', 'n', events, 'e', text)) == 'string' then
      redis.pcall('INCRBY', HISTORY_COUNT, events)
    end
  end
  history = {}
end

local function emit(name, now, fields)
  local heard, kept = events_wanted(), history_kept()
  if heard or kept then
    fields.event = name
    fields.ts = now / 1000
    local text = cjson.encode(fields)
    if heard then
      publish(EVENTS, text)
    end
    if kept then
      history[#history + 1] = text
    end
  end
end

-- Latency and throughput (docs/events.md): the workers count them and
-- add their counts up in Redis about once a second (record_metrics.lua): per
-- script since the queue began, in BASE .. 'metrics', and per minute, in
-- BASE .. 'metrics:' .. (ms // 60000), kept MINUTES_KEPT_MS. The scripts here
-- only keep what the counts need: a task's `ready_at` (when it last became
-- claimable: a retry's due time, a hand-back) beside its `enqueued_at`.
local MINUTES_KEPT_MS = 65 * 60000

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
  publish(DONE .. id, response)
end

-- A task's queue score. A record damaged from outside (not a number) sorts
-- first rather than aborting the script half-way: Redis does not roll a
-- script back, so a script must never fail after its first write.
local function score_of(id)
  return tonumber(redis.call('HGET', PREFIX .. id, 'score')) or 0
end

-- Move up to `limit` retries whose due time has come (`now`, ms) from the
-- `delayed` zset back to `pending`, at their stored queue score, status
-- `pending`. Shared by claim (a worker promotes before it claims) and
-- promote (the reaper's, while no worker claims). A damaged score does not
-- make it fail half-way (score_of). Returns how many were promoted.
local function promote_due(pending, delayed, limit, now)
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    redis.call('ZREM', delayed, id)
    redis.call('ZADD', pending, score_of(id), id)
    redis.call('HSET', PREFIX .. id, 'status', 'pending')
  end
  return #due
end

-- Append a failed attempt to the task's history (the last 20 are kept).
local function add_history(id, attempt, err, worker, now)
  local key = PREFIX .. id
  local ok, history = pcall(cjson.decode, redis.call('HGET', key, 'history') or '[]')
  if not ok or type(history) ~= 'table' then
    history = {}  -- a damaged history is replaced, never a reason to fail
  end
  history[#history + 1] = {attempt = tonumber(attempt), error = err, worker = worker, at = now / 1000}
  if #history > 20 then
    table.remove(history, 1)
  end
  redis.call('HSET', key, 'history', cjson.encode(history), 'error', err)
end

-- The fencing check: a report counts only from the worker that holds the
-- task's current attempt. A worker whose lease expired and was taken over
-- (or whose task was cancelled) is refused. Also returns the record's
-- `slot` (the domain slot it holds, for free_slot), read in the same call.
local function holds_lease(id, worker, attempt)
  local f = redis.call('HMGET', PREFIX .. id, 'status', 'worker', 'attempt', 'slot')
  return f[1] == 'running' and f[2] == worker and f[3] == attempt, f[4]
end

-- Rate limits -----------------------------------------------------------------
-- A task names its rate keys in its `rate_keys` field ("domain:HOST script:NAME",
-- space separated). The limits hash maps a rate key to tasks per second;
-- `default_domain` applies to every domain key without its own entry. A key
-- may also be paused (HTTP 429, or its circuit breaker open) until a time.
-- Starts are counted with GCRA on the Redis clock: a key at rate r admits a
-- burst of ceil(r) (at least 1), then one start every 1000 / r ms.

local function split_keys(text)
  local keys = {}
  for key in string.gmatch(text or '', '%S+') do
    keys[#keys + 1] = key
  end
  return keys
end

-- Politeness (docs/rate-limits.md). The scripts that start or end tasks name
-- three more keys and hand them to use_domains() first:
--   domains  zset: domain rate key K -> when K was last seen (ms): its last
--            start, its last 429/503, and, while tasks of K run, the reaper's
--            walk; but a start on claim's fast path (no limits, pauses or
--            breaker counts anywhere, nothing learned) stamps only K's first
--            one. The index the reaper walks to decay and forget idle
--            domains (prune_domains.lua)
--   policy   hash: active (1: a cap or adaptive applies, so claim looks at
--            every task that names a domain), cap (tasks of one domain
--            running at once, 0 = none), capped (1: some domain has its own),
--            cap:K (K's own cap), window (a new domain's window), adaptive
--            (1/0), start_rate, min_rate, max_retry_after_ms
--   gates    the gates zset: a slot given back makes K's gate due at once
-- Each domain has a small hash of its own, domains .. ':' .. K (KeySpace.domain):
--     n  the tasks of K running now, on every host (the in-flight cap counts
--        these), + 1 once K is known, + SETTLED once its window reached the
--        cap (absent until K's first start; see take_slot)
--     w  K's concurrency window, for a domain with no configured limit: the
--        policy's `window` for one not seen before (slow start), +1 per
--        success up to the cap, halved when K answers 429/503
--     r  the rate learned for K (tasks/s) once it answered 429/503
--     s  successes since r last changed
--     d  when r last decayed (ms)
--     x  the last 429/503 answers of K (ms, space separated, at most 16)
-- and the set domains .. ':paced' (KeySpace.paced) names the domains that
-- have an r. One small hash per domain, not one hash of every domain's
-- fields: a hash of hundreds of fields that stays a listpack
-- (hash-max-listpack-entries 512) made each write rewrite kilobytes
-- (measured: 3x Redis time per task).
-- A started task names the domain K whose slot it took in its record's `slot`
-- field ('+K' while its success widens K's window or raises its learned rate,
-- '' = none); free_slot() gives it back, once, on every path out of `running`.
-- A start reads none of K's hash while K is settled (its window reached the
-- cap, so only the cap binds) and has no learned rate: its in-flight HINCRBY
-- returns all it needs. `n` carries the settled mark for that reason.
-- Every call on a domain's hash is a pcall: a hash damaged from outside (a
-- field, or the key of another type) must not abort a claim half-way, which
-- would leave the task it popped in no set; it reads as empty instead.
local DOMAINS, POLICY, GATES_OF, PACED = nil, nil, nil, nil
-- The policy fields, read once per script call and only by a call that needs
-- them (a completion of tasks that hold no slot reads none).
local POLICY_FIELDS = {
  'active', 'cap', 'capped', 'window', 'adaptive', 'min_rate', 'start_rate',
  'max_retry_after_ms'}
local policy_values = nil
-- What a start asks of every task, from policy_values: the default cap (a
-- number), whether some domain has a cap of its own, whether adaptive is on.
local POLICY_CAP, POLICY_CAPPED, ADAPTIVE = 0, false, false
local function use_domains(domains, policy_key, gates)
  DOMAINS, POLICY, GATES_OF, PACED = domains, policy_key, gates, domains .. ':paced'
end

-- A policy field as stored (nil when absent). A policy hash damaged from
-- outside (another type) reads as empty, no politeness: a completion reads it
-- after its first write and must not abort half-way; set_limits rewrites it.
local function policy(field)
  if not policy_values then
    policy_values = {}
    local values = redis.pcall('HMGET', POLICY, unpack(POLICY_FIELDS))
    if values.err then
      values = {}
    end
    for i, name in ipairs(POLICY_FIELDS) do
      policy_values[name] = values[i]
    end
    POLICY_CAP = num(policy_values.cap, 0)
    POLICY_CAPPED = policy_values.capped == '1'
    ADAPTIVE = policy_values.adaptive == '1'
  end
  return policy_values[field]
end

-- The hash of domain key K's state.
local function domain_hash(key)
  return DOMAINS .. ':' .. key
end

-- The mark a domain's `n` carries once its window reached the cap (far above
-- any count of tasks), and the tasks running that a stored `n` says.
local SETTLED, SETTLED_TEXT = 1000000000, '1000000000'
local function running_of(n)
  n = tonumber(n) or 1
  return math.max(0, (n > SETTLED and n - SETTLED or n) - 1)
end

-- The domains a claim saw (see try_start), K -> true: stamp_domains() writes
-- them to the index once, at the end of the call (one ZADD, not one per task).
local started_domains = {}

-- Record in the index that the domains this claim saw were seen now.
local function stamp_domains(now)
  if next(started_domains) == nil then
    return
  end
  local args, at = {}, tostring(now)
  for key in pairs(started_domains) do
    args[#args + 1] = at
    args[#args + 1] = key
    if #args == 2000 then  -- unpack has a limit: 1,000 domains per ZADD
      redis.pcall('ZADD', DOMAINS, unpack(args))  -- the index only times pruning: never abort
      args = {}
    end
  end
  if #args > 0 then
    redis.pcall('ZADD', DOMAINS, unpack(args))
  end
  started_domains = {}
end

local function is_domain(key)
  return string.sub(key, 1, 7) == 'domain:'
end

-- Whether a rate-limit hash (limits, paused, breaker) exists, asked once per
-- script call: most deployments have no limits and nothing paused, and a
-- task then costs no lookups in them. A script that writes one of them marks
-- it (exists[key] = true).
local exists = {}
local function exists_now(key)
  if exists[key] == nil then
    exists[key] = redis.call('EXISTS', key) == 1
  end
  return exists[key]
end

-- The configured rate of a key (its own entry, else default_domain), or nil.
local function configured_rate(limits, key)
  if not exists_now(limits) then
    return nil
  end
  local rate = redis.call('HGET', limits, key)
  if not rate and is_domain(key) then
    rate = redis.call('HGET', limits, 'default_domain')
  end
  rate = tonumber(rate)
  return rate and rate > 0 and rate or nil  -- a damaged rate limits nothing
end

-- The rate a key runs at now: the configured one, or `learned` (the
-- domain's stored `r`, if any) where lower and adaptive is on (the configured
-- rate is the ceiling of learning), or nil: unlimited. Also returns the
-- configured rate.
local function rate_of(limits, key, learned)
  local configured = configured_rate(limits, key)
  local rate = configured
  learned = learned and policy('adaptive') == '1' and tonumber(learned)
  if learned and learned > 0 and (not rate or learned < rate) then
    rate = learned
  end
  return rate, configured
end

local function policy_num(field, default)
  return num(policy(field), default)
end

-- A domain's window from its stored `w` (absent: a new domain's).
local function window_of(raw)
  return tonumber(raw) or policy_num('window', 1)
end

-- How many tasks of domain key K may run at once (0: no cap). `capped` says
-- some domain has a cap of its own (set_limits writes it).
local function cap_of(key)
  policy('cap')  -- reads the policy, once per call
  if POLICY_CAPPED then
    local own = redis.call('HGET', POLICY, 'cap:' .. key)
    if own then
      return num(own, 0)
    end
  end
  return POLICY_CAP
end

-- A domain at its in-flight cap is looked at again this often, and at once
-- whenever one of its tasks leaves `running` (free_slot).
local CAP_RECHECK_MS = 1000

-- The first of `keys` that holds tasks back (limited or paused), or nil.
local function gate_for(limits, paused, keys)
  for _, key in ipairs(keys) do
    if redis.call('HEXISTS', paused, key) == 1 or rate_of(limits, key) then
      return key
    end
  end
  return nil
end

-- Whether domain key K has a learned rate that applies (adaptive on, K in
-- the paced set): only then does a start read K's `r`.
local function is_paced(key)
  policy('adaptive')  -- reads the policy, once per call
  -- pcall: a set damaged from outside (another type) reads as empty.
  return ADAPTIVE and exists_now(PACED) and redis.pcall('SISMEMBER', PACED, key) == 1
end

-- Take a slot of the domain whose hash is `hash`. Returns its tasks running
-- now, this one included, whether its window reached the cap (settled), and
-- whether this is its first start (no count before). The one HINCRBY says
-- all three (see `n` above). A count damaged from outside starts again.
local function take_slot(hash)
  local n = redis.pcall('HINCRBY', hash, 'n', '1')
  if type(n) ~= 'number' or n <= 1 then
    redis.pcall('HSET', hash, 'n', '2')
    return 1, false, n == 1
  end
  local settled = n > SETTLED
  return running_of(n), settled, false
end

-- The in-flight part of a start of a task of domain key K (its hash `hash`):
-- takes a slot when K's cap and window have room, and returns 0 and the
-- slot ('+K' when its success is to widen the window or raise the learned
-- rate, nil when K has no cap), or returns when to look again (ms), taking
-- nothing. `configured`: K's configured rate (a known site: no slow start);
-- `window`, `learned`: K's, when already read. K's window is read only when
-- the task would not be K's only one running (a window is never below 1).
-- The index learns of K at its first start (stamp_domains).
local function take_domain_slot(key, hash, configured, window, learned, now)
  local cap = cap_of(key)
  if cap <= 0 then
    return 0, nil
  end
  local running, settled, first = take_slot(hash)
  if first then
    started_domains[key] = true
  end
  -- A site with a configured limit is known: no slow start there.
  local slow = not configured and not settled
  if slow and running > 1 and not window then
    window = window_of(redis.pcall('HGET', hash, 'w'))
  end
  if running > ((slow and running > 1) and math.min(cap, window) or cap) then
    redis.pcall('HINCRBY', hash, 'n', '-1')
    return now + CAP_RECHECK_MS, nil
  end
  -- '+': its success widens the window or raises a learned rate; otherwise
  -- a completion reads nothing more.
  return 0, (slow or (learned and ADAPTIVE)) and ('+' .. key) or key
end

-- Try to start a task with these rate keys now. Returns 0 and takes a start
-- from every limited key (and a slot of its domain, returned third, when the
-- domain is capped), or returns the time (ms) it may start and the key that
-- holds it back, taking nothing. `breaker_settings` is the hash with the
-- circuit breaker's `failures` threshold and `cooldown_ms`.
--
-- A domain's hash is read for its learned rate only when it has one
-- (is_paced); its slot is taken last, when every other check passed
-- (take_domain_slot). A domain with nothing learned costs one command here.
local function try_start(limits, state, paused, breaker, breaker_settings, keys, now)
  local wait, blocker = 0, nil
  local plans = nil  -- key, its new GCRA state, key, ...
  local domain, hash, configured_here, window, learned = nil, nil, nil, nil, nil
  local check_paused = exists_now(paused)
  for i = 1, #keys do
    local key = keys[i]
    local until_ms = check_paused and num(redis.call('HGET', paused, key), 0) or 0
    if until_ms > now then
      if until_ms > wait then wait, blocker = until_ms, key end
    else
      if until_ms > 0 then redis.call('HDEL', paused, key) end
      local known = nil  -- this key's learned rate, as stored
      if DOMAINS and is_domain(key) then
        domain, hash = key, domain_hash(key)
        if is_paced(key) then
          local d = redis.pcall('HMGET', hash, 'w', 'r')
          window, known = window_of(d[1]), d[2]
        end
      end
      local rate, configured = rate_of(limits, key, known)
      if domain == key then
        configured_here, learned = configured, known and tonumber(known)
      end
      if rate then
        local interval = 1000 / rate
        local tolerance = interval * (math.max(1, math.ceil(rate)) - 1)
        local tat = math.max(num(redis.call('HGET', state, key), 0), now)
        if tat - now > tolerance then
          if tat - tolerance > wait then wait, blocker = tat - tolerance, key end
        else
          plans = plans or {}
          plans[#plans + 1] = key
          plans[#plans + 1] = tat + interval
        end
      end
    end
  end
  if wait > 0 then
    return wait, blocker, nil
  end
  local slot = nil
  if domain then
    local until_ms
    until_ms, slot = take_domain_slot(domain, hash, configured_here, window, learned, now)
    if until_ms > 0 then
      return until_ms, domain, nil
    end
  end
  if plans then
    for i = 1, #plans, 2 do
      redis.call('HSET', state, plans[i], plans[i + 1])
    end
  end
  -- Here a domain may hold more than its window (a learned rate, a GCRA
  -- state, breaker counts): each start keeps its idle time exact in the index,
  -- so none of it is forgotten while the domain is in use.
  if domain then
    started_domains[domain] = true
  end
  -- A key whose breaker is open lets this one task through as its probe and
  -- stays paused until the probe reports (success resumes it, failure re-opens).
  if exists_now(breaker) then
    local threshold = num(redis.call('HGET', breaker_settings, 'failures'), 0)
    for _, key in ipairs(keys) do
      if threshold > 0 and num(redis.call('HGET', breaker, key), 0) >= threshold then
        local cooldown = num(redis.call('HGET', breaker_settings, 'cooldown_ms'), 30000)
        redis.call('HSET', paused, key, now + cooldown)
        exists[paused] = true
      end
    end
  end
  return 0, nil, slot
end

-- After a success of domain key K whose rate was learned (`learned`, its
-- stored `r`; nil: nothing to learn): one more success
-- in the run; after about a second's worth (ceil(rate) successes) the rate
-- rises by a tenth (at least min_rate). Back at the configured ceiling (or
-- past 1000/s with none) the learned rate is dropped: the site showed no limit.
local MAX_LEARNED_RATE = 1000
local function learn_success(limits, key, learned, now)
  learned = tonumber(learned)
  if not learned then
    return
  end
  local hash = domain_hash(key)
  local run = num(redis.pcall('HINCRBY', hash, 's', '1'), 1)
  if run < math.max(1, math.ceil(learned)) then
    return
  end
  local ceiling = configured_rate(limits, key) or MAX_LEARNED_RATE
  local rate = learned + math.max(learned / 10, policy_num('min_rate', 0.05))
  if rate >= ceiling then
    redis.pcall('HDEL', hash, 'r', 's', 'd')
    redis.pcall('SREM', PACED, key)  -- the set only saves reads: never abort
    emit('rate.adjusted', now, {key = key, rate = configured_rate(limits, key), reason = 'restored'})
  else
    redis.pcall('HSET', hash, 'r', rate, 's', 0)
    emit('rate.adjusted', now, {key = key, rate = rate, reason = 'increased'})
  end
end

-- Give back the domain slot a task holds (`slot`: its record's `slot`, the
-- domain key, '+'-prefixed when a success still teaches something; nil or
-- '' = none). Called once per attempt, by the script that moves the task out
-- of `running` (each checks that it is running).
-- `success`: the task completed, so its domain's window and learned rate grow.
-- A task of the domain waiting at its gate may start at once: the gate is
-- made due and the workers are woken (once per script call).
local slot_woken = false
local function free_slot(slot, now, success, limits)
  if not DOMAINS or not slot or slot == '' then
    return
  end
  local grows = string.byte(slot) == 43  -- '+'
  local key = grows and string.sub(slot, 2) or slot
  local hash = domain_hash(key)
  local left = redis.pcall('HINCRBY', hash, 'n', '-1')
  if type(left) ~= 'number' or left < 1 then
    redis.pcall('HSET', hash, 'n', '1')  -- damaged from outside: start again
    left = 1
  end
  if success and grows then
    local d = redis.pcall('HMGET', hash, 'w', 'r')
    local window, cap = window_of(d[1]), cap_of(key)
    if window < cap then
      window = window + 1
      redis.pcall('HSET', hash, 'w', window)
    end
    if window >= cap and left <= SETTLED then
      redis.pcall('HINCRBY', hash, 'n', SETTLED_TEXT)  -- the window reached the cap
    end
    if limits then
      learn_success(limits, key, d[2], now)
    end
  end
  local due = exists_now(GATES_OF) and redis.call('ZSCORE', GATES_OF, key)
  if due and num(due, 0) > now then
    redis.call('ZADD', GATES_OF, 'XX', now, key)
    if not slot_woken then
      slot_woken = true
      publish(WAKE, 1)
    end
  end
end

-- Domain key K answered 429 or 503 (`reason`: rate_limited, unavailable): its
-- window halves, and, with adaptive on, its rate drops by half (from the
-- learned rate, else the configured one, else to start_rate), never below
-- min_rate. The pause ends with one probe, then the new pace, not a burst:
-- K's GCRA state is set so that the pause's end admits one task.
-- Records the answer (x) for status. Returns the new rate, or nil.
local THROTTLE_ROUND_MS = 1000
local function learn_throttle(limits, state, key, now, until_ms, reason)
  local hash = domain_hash(key)
  local answers = redis.pcall('HGET', hash, 'x')
  local recent = split_keys(type(answers) == 'string' and answers or '')
  local previous = num(recent[#recent], 0)
  recent[#recent + 1] = tostring(now)
  while #recent > 16 do
    table.remove(recent, 1)
  end
  redis.pcall('HSET', hash, 'x', table.concat(recent, ' '))
  redis.pcall('ZADD', DOMAINS, now, key)  -- the index only times pruning: never abort
  -- Answers to requests sent together (up to the window) arrive together:
  -- like TCP's one decrease per round trip, they count as one signal.
  if now - previous < THROTTLE_ROUND_MS then
    return nil
  end
  if cap_of(key) > 0 then
    local d = redis.pcall('HMGET', hash, 'w', 'n')
    redis.pcall('HSET', hash, 'w', math.max(1, math.floor(window_of(d[1]) / 2)))
    if num(d[2], 0) > SETTLED then
      redis.pcall('HINCRBY', hash, 'n', '-' .. SETTLED_TEXT)  -- slow start again
    end
  end
  if policy_num('adaptive', 0) ~= 1 then
    return nil
  end
  local current = tonumber(redis.pcall('HGET', hash, 'r'))
    or configured_rate(limits, key)
  local floor = policy_num('min_rate', 0.05)
  local rate = current and math.max(floor, current / 2) or math.max(floor, policy_num('start_rate', 1))
  redis.pcall('HSET', hash, 'r', rate, 's', 0)
  redis.pcall('HDEL', hash, 'd')
  redis.pcall('SADD', PACED, key)  -- never abort (a set damaged from outside)
  exists[PACED] = true
  local interval = 1000 / rate
  redis.call('HSET', state, key, until_ms + interval * (math.max(1, math.ceil(rate)) - 1))
  emit('rate.adjusted', now, {key = key, rate = rate, reason = reason})
  return rate
end

-- Put a pending task into the gate of `key` (it waits there, keeping its
-- queue score, until the key admits it) and make sure the key is scheduled.
local function enter_gate(gates, stats, gate_prefix, key, id, score, ready_at)
  redis.call('ZADD', gate_prefix .. key, score, id)
  redis.call('HSET', PREFIX .. id, 'gate', key)
  redis.call('ZADD', gates, 'NX', ready_at, key)
  exists[gates] = true
  count_up(stats, 'gated', 1)
end
