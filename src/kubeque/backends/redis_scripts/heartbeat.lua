-- Extend the leases `worker` still holds.
-- ARGV: prefix, worker, lease_ms, n, then n pairs (id, attempt). Returns renewed ids.
local worker, lease_ms, n = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_us()
local lease = now + lease_ms * 1000
local out = {}
for i = 0, n - 1 do
  local id = ARGV[5 + i * 2]
  local k = held(id, ARGV[6 + i * 2])
  if k and redis.call('HGET', k, 'worker') == worker then
    redis.call('HSET', k, 'lease_expires_at', iso(lease), '_lease', int(lease))
    redis.call('ZADD', P .. 'processing', int(lease), id)
    out[#out + 1] = id
  end
end
return out
