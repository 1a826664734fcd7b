-- Delete up to `limit` tasks of the given statuses not updated for older_than_ms.
-- ARGV: prefix, older_than_ms, limit, statuses... Returns the number deleted.
local older_ms, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local cutoff = now_us() - older_ms * 1000
local done = 0
for i = 4, #ARGV do
  if done >= limit then break end
  local ids = redis.call('ZRANGEBYSCORE', P .. 'u:' .. ARGV[i], '-inf', int(cutoff), 'LIMIT', 0, limit - done)
  for _, id in ipairs(ids) do
    deindex(id)
    redis.call('ZREM', P .. 'all', id)
    redis.call('DEL', tkey(id))
    done = done + 1
  end
end
return done
