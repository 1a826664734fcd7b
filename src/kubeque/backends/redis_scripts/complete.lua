-- Mark held attempts completed with their results.
-- ARGV: prefix, n, then n triples (id, attempt, result json). Returns ids whose guard held.
local n = tonumber(ARGV[2])
local now = now_us()
local fields = end_fields(now, '"completed"', nil)
local out = {}
for i = 0, n - 1 do
  local a = 3 + i * 3
  local id = ARGV[a]
  local k = held(id, ARGV[a + 1])
  if k then
    deindex(id)
    close_log(k, fields)
    drop_lease(k)
    redis.call('HSET', k, 'status', 'completed', 'result', ARGV[a + 2])
    touch(k, now)
    index(id, now)
    out[#out + 1] = id
  end
end
return out
