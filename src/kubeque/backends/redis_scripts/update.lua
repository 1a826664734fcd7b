-- Change fields of a task and keep its indexes consistent.
-- ARGV: prefix, id, status or '', run_at µs or '', run_at ISO, priority sort key or '',
--       n, then n pairs (field, stored value) for the other fields.
-- Setting status=pending on a task that was not pending resets run_at to now unless given.
-- A task that is not processing holds no worker or lease.
-- A status change (a manual retry) never lands on a processing task: that would
-- take the running attempt back while another worker starts the next one.
-- Returns the task as a flat field/value list, nil if there is no such task, or
-- 'busy' (changing nothing) if status is given and the task is processing.
local id, status, run, run_iso, pk = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local n = tonumber(ARGV[7])
local k = tkey(id)
local old = redis.call('HGET', k, 'status')
if not old then return false end
if status ~= '' and old == 'processing' then return 'busy' end
local now = now_us()
deindex(id)
for i = 0, n - 1 do
  redis.call('HSET', k, ARGV[8 + i * 2], ARGV[9 + i * 2])
end
if pk ~= '' then redis.call('HSET', k, '_pk', pk) end
if run ~= '' then redis.call('HSET', k, 'run_at', run_iso, '_run', run) end
local new = old
if status ~= '' then
  new = status
  redis.call('HSET', k, 'status', status)
end
if new == 'pending' and old ~= 'pending' and run == '' then
  redis.call('HSET', k, 'run_at', iso(now), '_run', int(now))
end
if new ~= 'processing' then drop_lease(k) end
touch(k, now)
index(id, now)
wake()
return redis.call('HGETALL', k)
