-- tmdb-proxy: the shared budget. One script, several operations (ARGV[1]), so one EVALSHA
-- covers every call. The math is the local limiter's (src/limiter/bucket.rs): a sliding-window
-- log per budget, paced once it has run dry, paused after an upstream 429. Times are
-- microseconds on Redis's own clock (TIME), so the replicas' clocks do not matter.
--
-- Per budget (a key, or the global ceiling), two Redis keys sharing one hash tag:
--   log    sorted set of admission stamps: member "<us>:<seq>:<replica>", score <us>
--   state  hash: tat (next paced slot), dry (when last found dry), pause (no admission before)
-- Queued requests hold stamps in the future. Both keys expire a window after the last stamp.

local SKEW = 1000 -- a stamp this close ahead of now counts as the present (CLOCK_SKEW)

-- Numbers go to Redis as integer text: Lua would print 16-digit microseconds as 1.7e+15.
local function int(x)
  return string.format('%d', x)
end

local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- A budget's state at `now`: stamps that refilled are dropped.
local function load(log, state, cap, win, spacing, tol, now)
  redis.call('ZREMRANGEBYSCORE', log, '-inf', int(now - win))
  local raw = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
  local spent = {}
  for i = 2, #raw, 2 do
    spent[#spent + 1] = tonumber(raw[i])
  end
  local f = redis.call('HMGET', state, 'tat', 'dry', 'pause')
  local b = {
    log = log, state = state, cap = cap, win = win, spacing = spacing, tol = tol,
    spent = spent, tat = tonumber(f[1]), dry = tonumber(f[2]) or 0,
    pause = tonumber(f[3]) or 0,
  }
  return b
end

-- Starts or stops pacing, as Bucket::refill.
local function refill(b, now)
  if #b.spent >= b.cap then
    b.dry = now
    if not b.tat then b.tat = now end
  elseif #b.spent == 0 and b.dry + b.win <= now then
    b.tat = nil
  end
end

-- Earliest slot at or after `now`, behind queued requests, pacing and any pause.
local function next_slot(b, now)
  local slot = now
  local n = #b.spent
  if n > 0 and b.spent[n] > slot then slot = b.spent[n] end
  if b.tat and b.tat - b.tol > slot then slot = b.tat - b.tol end
  if b.pause > slot then slot = b.pause end
  if n >= b.cap then
    local refills = b.spent[n - b.cap + 1] + b.win
    if refills > slot then slot = refills end
  end
  return slot
end

-- Tokens free at `at`.
local function free_at(b, at)
  local held = 0
  for i = 1, #b.spent do
    if b.spent[i] + b.win > at then held = held + 1 end
  end
  return math.max(b.cap - held, 0)
end

-- Whether a stamp at `t` keeps every window at or under capacity.
local function fits(b, t)
  local all = {}
  local p = 0
  for i = 1, #b.spent do
    if b.spent[i] <= t then p = i end
    all[#all + 1] = b.spent[i]
  end
  table.insert(all, p + 1, t)
  local at = p + 1
  for i = math.max(1, at - b.cap), at do
    if i + b.cap <= #all and all[i + b.cap] - all[i] < b.win then return false end
  end
  return true
end

local function member(at, seq, replica)
  return string.format('%d:%d:%s', at, seq, replica)
end

-- Adds a stamp at `at` under a member no other stamp holds: the first free sequence number from
-- `seq` on (mod 1000). Returns the one used, which the proxy keeps to name the stamp later.
local function add(log, at, seq, replica)
  local s = tonumber(seq) % 1000
  for _ = 1, 1000 do
    if redis.call('ZADD', log, 'NX', int(at), member(at, s, replica)) == 1 then return s end
    s = (s + 1) % 1000
  end
  return s
end

-- Bucket::acquire without given-back slots: {1, at, remaining, next_free, seq} or
-- {0, next_free, in_window}.
local function acquire(b, now, max_wait, seq, replica)
  refill(b, now)
  local n = #b.spent
  if n > 0 and b.spent[n] > now and b.spent[n] - now <= SKEW then now = b.spent[n] end
  local at = next_slot(b, now)
  if at - now > max_wait then return { 0, at, #b.spent } end
  b.spent[#b.spent + 1] = at
  if b.tat then b.tat = math.max(b.tat, at) + b.spacing end
  local used = add(b.log, at, seq, replica)
  return { 1, at, free_at(b, at), next_slot(b, now), used }
end

-- Writes pacing and pause back, and keeps both keys a window past their last use.
local function save(b, now)
  if b.tat then
    redis.call('HSET', b.state, 'tat', int(b.tat), 'dry', int(b.dry), 'pause', int(b.pause))
  else
    redis.call('HSET', b.state, 'dry', int(b.dry), 'pause', int(b.pause))
    redis.call('HDEL', b.state, 'tat')
  end
  local last = now
  if #b.spent > 0 and b.spent[#b.spent] > last then last = b.spent[#b.spent] end
  if b.pause > last then last = b.pause end
  local ttl = math.floor((last - now + b.win) / 1000) + 1000
  redis.call('PEXPIRE', b.log, int(ttl))
  redis.call('PEXPIRE', b.state, int(ttl))
end

local op = ARGV[1]
local replica = ARGV[2]
local now = clock()

-- acquire: KEYS key log, key state[, global log, global state]
-- ARGV op, replica, key cap, win, spacing, tol, global cap (0: none), win, spacing, tol, then per
-- token: max_wait, key seq, global seq.
-- Per token: {1, key at, remaining, next_free, global at (-1: none, -2: at the key's turn), key
-- seq, global seq (-1: none)}, or
-- {0, next_free, in_window, paused (1/0)} for the key, or {2, next_free, in_window} for the global.
if op == 'acquire' then
  local k = load(KEYS[1], KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
    tonumber(ARGV[6]), now)
  local gcap = tonumber(ARGV[7])
  local g = nil
  if gcap > 0 then
    g = load(KEYS[3], KEYS[4], gcap, tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), now)
  end
  local out = { now }
  local i = 11
  while i + 2 <= #ARGV do
    local max_wait, kseq, gseq = tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2]
    i = i + 3
    local r = acquire(k, now, max_wait, kseq, replica)
    if r[1] == 0 then
      local paused = 0
      if k.pause > now then paused = 1 end
      out[#out + 1] = { 0, r[2], r[3], paused }
    elseif g == nil then
      out[#out + 1] = { 1, r[2], r[3], r[4], -1, r[5], -1 }
    elseif r[2] - now > SKEW then
      -- Queued for the key's turn: the global token is taken when it comes.
      out[#out + 1] = { 1, r[2], r[3], r[4], -2, r[5], -1 }
    else
      local gr = acquire(g, now, max_wait, gseq, replica)
      if gr[1] == 1 then
        out[#out + 1] = { 1, r[2], r[3], r[4], gr[2], r[5], gr[5] }
      else
        -- Give the key's token back: the request does not go.
        table.remove(k.spent)
        redis.call('ZREM', k.log, member(r[2], r[5], replica))
        out[#out + 1] = { 2, gr[2], gr[3] }
      end
    end
  end
  save(k, now)
  if g then save(g, now) end
  return out
end

-- resume: KEYS key log, key state[, global log, global state]
-- ARGV op, replica, global cap (0: none), win, spacing, tol, max_wait, global seq.
-- {now, 1, global at (-1: none), global seq}, {now, 0} when the key is paused,
-- {now, 2, next_free, in_window}.
if op == 'resume' then
  local pause = tonumber(redis.call('HGET', KEYS[2], 'pause')) or 0
  if pause > now then return { now, 0 } end
  local gcap = tonumber(ARGV[3])
  if gcap == 0 then return { now, 1, -1, -1 } end
  local g = load(KEYS[3], KEYS[4], gcap, tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), now)
  local r = acquire(g, now, tonumber(ARGV[7]), ARGV[8], replica)
  save(g, now)
  if r[1] == 1 then return { now, 1, r[2], r[5] } end
  return { now, 2, r[2], r[3] }
end

-- confirm: KEYS per stamp: log, state (the key's first)
-- ARGV op, replica, then per stamp: old at, old seq, new seq, cap, win, spacing, tol.
-- Moves each stamp to now if it still fits. {now, 1, new seq...}, or {now, 0, 1 paused / 0 no fit}.
if op == 'confirm' then
  local moved = { now, 1 }
  local budgets = {}
  for s = 1, #KEYS / 2 do
    local a = 3 + (s - 1) * 7
    local old, oseq, nseq = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2]
    local b = load(KEYS[2 * s - 1], KEYS[2 * s], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]),
      tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), now)
    if b.pause > now then return { now, 0, 1 } end
    for i = #b.spent, 1, -1 do
      if b.spent[i] == old then table.remove(b.spent, i) break end
    end
    if not fits(b, now) then return { now, 0, 0 } end
    budgets[s] = { b, old, oseq, nseq }
  end
  for s = 1, #budgets do
    local b, old, oseq, nseq = budgets[s][1], budgets[s][2], budgets[s][3], budgets[s][4]
    redis.call('ZREM', b.log, member(old, oseq, replica))
    moved[#moved + 1] = add(b.log, now, nseq, replica)
    save(b, now)
  end
  return moved
end

-- release: KEYS logs; ARGV op, replica, then one member per key.
if op == 'release' then
  for s = 1, #KEYS do
    redis.call('ZREM', KEYS[s], ARGV[2 + s])
  end
  return { now }
end

-- pause: KEYS key log, key state; ARGV op, replica, wait, win.
-- {now, 1} if the key was not paused already, else {now, 0}.
if op == 'pause' then
  local until_us = now + tonumber(ARGV[3])
  local pause = tonumber(redis.call('HGET', KEYS[2], 'pause')) or 0
  if until_us > pause then
    redis.call('HSET', KEYS[2], 'pause', int(until_us))
    local ttl = math.floor((until_us - now + tonumber(ARGV[4])) / 1000) + 1000
    redis.call('PEXPIRE', KEYS[2], int(ttl))
  end
  if pause > now then return { now, 0 } end
  return { now, 1 }
end

-- record: KEYS log; ARGV op, replica, win, then pairs of (ago us, seq): admissions this replica
-- made on its own while Redis was away (negative ago: queued), added so the shared log counts
-- them.
if op == 'record' then
  local win = tonumber(ARGV[3])
  local last = now
  for i = 4, #ARGV - 1, 2 do
    local at = now - tonumber(ARGV[i])
    if at + win > now then
      add(KEYS[1], at, ARGV[i + 1], replica)
      if at > last then last = at end
    end
  end
  local ttl = math.floor((last - now + win) / 1000) + 1000
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], int(ttl)) end
  return { now }
end

-- ping: {now}; loads nothing, proves the script runs.
return { now }
