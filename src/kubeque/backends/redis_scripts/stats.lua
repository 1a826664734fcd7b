-- Counts per status and the run_at of the oldest pending task.
-- ARGV: prefix, statuses... Returns {now µs, count per status..., oldest run_at µs or ''}.
local out = {int(now_us())}
for i = 2, #ARGV do
  out[#out + 1] = redis.call('ZCARD', P .. 's:' .. ARGV[i])
end
local first = redis.call('ZRANGE', P .. 'pend', 0, 0, 'WITHSCORES')
out[#out + 1] = first[2] or ''
return out
