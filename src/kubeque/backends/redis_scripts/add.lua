-- Store a batch of new tasks, all or none.
-- ARGV: prefix, n, then per task 12 values:
--   id, handler, payload json, extra json, priority, priority sort key,
--   max_retries, max_processing_time, retry_backoff_ms,
--   run_at µs or '' (then now + delay_ms), run_at ISO or '', delay_ms
-- Returns {'dup', id} when an id exists or repeats, else {'ok', task, task, ...}
-- where each task is its hash as a flat field/value list.
local n = tonumber(ARGV[2])
local W = 12
local seen = {}
for i = 0, n - 1 do
  local id = ARGV[3 + i * W]
  if seen[id] or redis.call('EXISTS', tkey(id)) == 1 then return {'dup', id} end
  seen[id] = true
end
if n == 0 then return {'ok'} end
local now = now_us()
local first = redis.call('INCRBY', P .. 'seq', n) - n + 1
local out = {'ok'}
for i = 0, n - 1 do
  local a = 3 + i * W
  local id = ARGV[a]
  local run, run_iso = ARGV[a + 9], ARGV[a + 10]
  if run == '' then
    local r = now + tonumber(ARGV[a + 11]) * 1000
    run, run_iso = int(r), iso(r)
  end
  local seq = int(first + i)
  local k = tkey(id)
  redis.call('HSET', k,
    'id', id, 'handler', ARGV[a + 1], 'payload', ARGV[a + 2], 'extra', ARGV[a + 3],
    'status', 'pending', 'log', '[]', 'result', 'null',
    'created_at', iso(now), 'updated_at', iso(now), '_upd', int(now),
    'priority', ARGV[a + 4], '_pk', ARGV[a + 5],
    'max_retries', ARGV[a + 6], 'max_processing_time', ARGV[a + 7], 'retry_backoff_ms', ARGV[a + 8],
    'retry_count', '0', 'attempt', '0', 'seq', seq, 'run_at', run_iso, '_run', run)
  redis.call('ZADD', P .. 'all', seq, id)
  index(id, now)
  out[#out + 1] = redis.call('HGETALL', k)
end
wake()
return out
