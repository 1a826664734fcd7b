-- Processing tasks whose lease has run out, in seq order.
-- ARGV: prefix, limit, scan_max. Returns tasks as flat field/value lists.
local limit, scan_max = tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_us()
local ids = redis.call('ZRANGEBYSCORE', P .. 'processing', '-inf', int(now), 'LIMIT', 0, scan_max)
local rows = {}
for _, id in ipairs(ids) do
  local seq = redis.call('HGET', tkey(id), 'seq')
  if seq then rows[#rows + 1] = {tonumber(seq), id} end
end
table.sort(rows, function(a, b) return a[1] < b[1] end)
local out = {}
for i = 1, math.min(limit, #rows) do
  out[#out + 1] = redis.call('HGETALL', tkey(rows[i][2]))
end
return out
