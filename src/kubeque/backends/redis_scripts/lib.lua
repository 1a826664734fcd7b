-- Helpers shared by every kubeque script. RedisRepository prepends this file to
-- each script, so a script and its helpers run as one atomic unit.
--
-- ARGV[1] is always the key prefix "kubeque:<queue>:" (P below). Keys:
--   P task:<id>        hash, one per task. payload/result/extra/log hold JSON text
--                      (never decoded here: cjson would round numbers to 14 digits),
--                      times are ISO 8601 UTC strings. Internal fields: _run, _lease,
--                      _upd (run_at, lease expiry, updated_at in microseconds), _pk
--                      (priority sort key), _rk (member in the ready sets, while there).
--   P seq              INCR counter: insertion order
--   P all              zset id by seq, every task (list)
--   P s:<status>       zset id by seq, per status (list, stats)
--   P u:<status>       zset id by updated_at, per status (purge)
--   P ready            zset of due pending tasks; every score is 0 and the member is
--                      _pk .. run_at .. seq .. id in fixed-width digits, so rank order
--                      is priority DESC, run_at ASC, seq ASC
--   P ready:<handler>  the same, per handler (dequeue with a handler filter)
--   P delayed          zset id by run_at: pending tasks not yet moved to ready
--   P pend             zset id by run_at: every pending task (oldest pending age)
--   P processing       zset id by lease expiry (expired)
--   P wake             pub/sub channel, published when work may have become due
-- All times come from this server's TIME: the queue has one clock.

local P = ARGV[1]
local KEY_PREFIX_LEN = 52 -- _pk (20) + run_at (16) + seq (16) digits before the id

-- Lua numbers reach redis.call as %.14g text; integers must be formatted exactly.
local function int(n)
  return string.format('%d', n)
end

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Microseconds since the epoch -> ISO 8601 with UTC offset (civil-from-days,
-- because scripts have no os.date).
local function iso(us)
  local secs = math.floor(us / 1000000)
  local micros = us - secs * 1000000
  if micros < 0 then secs = secs - 1; micros = micros + 1000000 end
  if micros >= 1000000 then secs = secs + 1; micros = micros - 1000000 end
  local days = math.floor(secs / 86400)
  local sod = secs - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400
  if month <= 2 then year = year + 1 end
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%06d+00:00', year, month, day,
    math.floor(sod / 3600), math.floor((sod % 3600) / 60), sod % 60, micros)
end

local function tkey(id)
  return P .. 'task:' .. id
end

local function ready_member(pk, run, seq, id)
  -- only due tasks are ready, so run_at fits 16 digits until 2286; clamp the past at the epoch
  local r = math.max(0, math.min(tonumber(run), 9999999999999999))
  return pk .. string.format('%016d%016d', r, tonumber(seq)) .. id
end

local function make_ready(id, k, pk, run, seq, handler)
  local m = ready_member(pk, run, seq, id)
  redis.call('HSET', k, '_rk', m)
  redis.call('ZADD', P .. 'ready', 0, m)
  redis.call('ZADD', P .. 'ready:' .. handler, 0, m)
end

-- Take a task out of every state index; the caller changes it, then calls index().
local function deindex(id)
  local k = tkey(id)
  local f = redis.call('HMGET', k, 'status', '_rk', 'handler')
  local status, rk, handler = f[1], f[2], f[3]
  if status then
    redis.call('ZREM', P .. 's:' .. status, id)
    redis.call('ZREM', P .. 'u:' .. status, id)
  end
  if rk then
    redis.call('ZREM', P .. 'ready', rk)
    if handler then redis.call('ZREM', P .. 'ready:' .. handler, rk) end
    redis.call('HDEL', k, '_rk')
  end
  redis.call('ZREM', P .. 'delayed', id)
  redis.call('ZREM', P .. 'pend', id)
  redis.call('ZREM', P .. 'processing', id)
end

-- Put a task into the indexes its current fields call for.
local function index(id, now)
  local k = tkey(id)
  local f = redis.call('HMGET', k, 'status', 'seq', '_upd', '_run', '_pk', 'handler', '_lease')
  local status, seq, upd, run, pk, handler, lease = f[1], f[2], f[3], f[4], f[5], f[6], f[7]
  redis.call('ZADD', P .. 's:' .. status, seq, id)
  redis.call('ZADD', P .. 'u:' .. status, upd, id)
  if status == 'pending' then
    redis.call('ZADD', P .. 'pend', run, id)
    if tonumber(run) <= now then
      make_ready(id, k, pk, run, seq, handler)
    else
      redis.call('ZADD', P .. 'delayed', run, id)
    end
  elseif status == 'processing' and lease then
    redis.call('ZADD', P .. 'processing', lease, id)
  end
end

-- Move delayed tasks that have come due into the ready sets.
local function promote(now, max)
  local ids = redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', int(now), 'LIMIT', 0, max)
  for _, id in ipairs(ids) do
    redis.call('ZREM', P .. 'delayed', id)
    local k = tkey(id)
    local f = redis.call('HMGET', k, 'status', '_pk', '_run', 'seq', 'handler')
    if f[1] == 'pending' then make_ready(id, k, f[2], f[3], f[4], f[5]) end
  end
end

-- The hash key of a task still held in (status processing, attempt), else nil.
local function held(id, attempt)
  local k = tkey(id)
  local f = redis.call('HMGET', k, 'status', 'attempt')
  if f[1] == 'processing' and tonumber(f[2]) == tonumber(attempt) then return k end
  return nil
end

local function touch(k, now)
  redis.call('HSET', k, 'updated_at', iso(now), '_upd', int(now))
end

local function drop_lease(k)
  redis.call('HDEL', k, 'worker', 'lease_expires_at', '_lease')
end

-- Merge end fields (JSON members text) into the last log entry. Log entries are
-- written only by these scripts, so the log always ends with '}]'; a repeated
-- key is read back last-wins, as a dict update would leave it.
local function close_log(k, fields)
  local log = redis.call('HGET', k, 'log')
  if (not log) or log == '[]' or string.sub(log, -2) ~= '}]' then return end
  redis.call('HSET', k, 'log', string.sub(log, 1, -3) .. ',' .. fields .. '}]')
end

local function end_fields(now, outcome_json, error_json)
  local s = '"ended_at":"' .. iso(now) .. '","outcome":' .. outcome_json
  if error_json and error_json ~= '' then s = s .. ',"error":' .. error_json end
  return s
end

local function wake()
  redis.call('PUBLISH', P .. 'wake', '1')
end
