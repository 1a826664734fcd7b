-- How soon pending work is due, for wait_for_work.
-- ARGV: prefix. Returns {ready count, µs until the first delayed task is due or -1}.
local now = now_us()
local first = redis.call('ZRANGE', P .. 'delayed', 0, 0, 'WITHSCORES')
local due_in = -1
if first[2] then due_in = math.max(0, tonumber(first[2]) - now) end
return {redis.call('ZCARD', P .. 'ready'), int(due_in)}
