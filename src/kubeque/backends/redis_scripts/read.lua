-- Tasks in seq order from one index ('all' or 's:<status>'), as one snapshot.
-- ARGV: prefix, index name, limit (-1: all). Returns tasks as flat field/value lists.
local limit = tonumber(ARGV[3])
if limit == 0 then return {} end
local stop = -1
if limit > 0 then stop = limit - 1 end
local out = {}
for _, id in ipairs(redis.call('ZRANGE', P .. ARGV[2], 0, stop)) do
  local t = redis.call('HGETALL', tkey(id))
  if #t > 0 then out[#out + 1] = t end
end
return out
