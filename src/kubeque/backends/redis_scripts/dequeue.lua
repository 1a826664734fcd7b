-- Take up to `limit` due pending tasks in queue order and start an attempt on each.
-- ARGV: prefix, worker, worker as JSON, limit, lease_ms, promote_max,
--       handler count (-1: any handler), handlers...
-- Returns the taken tasks, each as a flat field/value list.
local worker, worker_json = ARGV[2], ARGV[3]
local limit, lease_ms, promote_max = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local nh = tonumber(ARGV[7])
local now = now_us()
promote(now, promote_max)

local members
if nh < 0 then
  members = redis.call('ZRANGE', P .. 'ready', 0, limit - 1)
else
  -- each per-handler set is already in queue order: merge their heads
  members = {}
  for i = 1, nh do
    for _, m in ipairs(redis.call('ZRANGE', P .. 'ready:' .. ARGV[7 + i], 0, limit - 1)) do
      members[#members + 1] = m
    end
  end
  -- the digit prefix is unique (it holds seq), so it alone decides the order
  table.sort(members, function(a, b)
    return string.sub(a, 1, KEY_PREFIX_LEN) < string.sub(b, 1, KEY_PREFIX_LEN)
  end)
end

local out = {}
local lease = now + lease_ms * 1000
for _, m in ipairs(members) do
  if #out >= limit then break end
  local id = string.sub(m, KEY_PREFIX_LEN + 1)
  local k = tkey(id)
  local f = redis.call('HMGET', k, 'status', 'attempt', 'log')
  if f[1] ~= 'pending' then
    -- an index entry without its task: drop it rather than hand it out
    redis.call('ZREM', P .. 'ready', m)
  else
    local attempt = tonumber(f[2]) + 1
    local entry = '{"attempt":' .. int(attempt) .. ',"worker":' .. worker_json ..
      ',"started_at":"' .. iso(now) .. '"}'
    local log = f[3]
    if log == '[]' then log = '[' .. entry .. ']' else log = string.sub(log, 1, -2) .. ',' .. entry .. ']' end
    deindex(id)
    redis.call('HSET', k, 'status', 'processing', 'attempt', int(attempt), 'worker', worker,
      'lease_expires_at', iso(lease), '_lease', int(lease), 'log', log)
    touch(k, now)
    index(id, now)
    out[#out + 1] = redis.call('HGETALL', k)
  end
end
return out
