-- Return held tasks to pending without spending a retry.
-- ARGV: prefix, n, then n pairs (id, attempt). Returns released ids.
local n = tonumber(ARGV[2])
local now = now_us()
local fields = end_fields(now, '"released"', nil)
local out = {}
for i = 0, n - 1 do
  local id = ARGV[3 + i * 2]
  local k = held(id, ARGV[4 + i * 2])
  if k then
    deindex(id)
    close_log(k, fields)
    drop_lease(k)
    redis.call('HSET', k, 'status', 'pending')
    touch(k, now)
    index(id, now)
    out[#out + 1] = id
  end
end
wake()
return out
