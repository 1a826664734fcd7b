-- Remove a task: soft sets status deleted, hard deletes it.
-- ARGV: prefix, id, hard (1/0). Returns 1, or 0 if there is no such task.
local id, hard = ARGV[2], ARGV[3] == '1'
local k = tkey(id)
if redis.call('EXISTS', k) == 0 then return 0 end
deindex(id)
if hard then
  redis.call('ZREM', P .. 'all', id)
  redis.call('DEL', k)
  return 1
end
local now = now_us()
if redis.call('HGET', k, 'status') == 'processing' then
  close_log(k, end_fields(now, '"removed"'))  -- the attempt running now ends here
end
drop_lease(k)
redis.call('HSET', k, 'status', 'deleted')
touch(k, now)
index(id, now)
return 1
