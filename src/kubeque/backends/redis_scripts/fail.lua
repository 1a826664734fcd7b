-- Record a failed attempt: back to pending with a delay while retries remain
-- (and the failure is not final), else failed.
-- ARGV: prefix, id, attempt, outcome json, error json, retry_delay_ms,
--       only_if_expired (1/0), final (1/0), max_retries to use when the task
--       stores none (its handler was unknown where it was added).
-- Returns 'retried', 'failed', or nil when the guard did not hold.
local id, attempt = ARGV[2], ARGV[3]
local delay_ms = tonumber(ARGV[6])
local only_if_expired, final = ARGV[7] == '1', ARGV[8] == '1'
local k = held(id, attempt)
if not k then return false end
local now = now_us()
local f = redis.call('HMGET', k, '_lease', 'retry_count', 'max_retries')
if only_if_expired and ((not f[1]) or tonumber(f[1]) > now) then return false end
deindex(id)
close_log(k, end_fields(now, ARGV[4], ARGV[5]))
drop_lease(k)
touch(k, now)
local retries = tonumber(f[2])
local limit = tonumber(f[3]) or tonumber(ARGV[9])
if (not final) and retries < limit then
  local run = now + delay_ms * 1000
  redis.call('HSET', k, 'status', 'pending', 'retry_count', int(retries + 1),
    'run_at', iso(run), '_run', int(run))
  index(id, now)
  wake()
  return 'retried'
end
redis.call('HSET', k, 'status', 'failed')
index(id, now)
return 'failed'
