-- KEYS: meta, queue. ARGV: now. Queued items are dropped; running ones finish.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
if state == 'queued' or state == 'running' then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'state', 'cancelled')
  if tonumber(redis.call('HGET', KEYS[1], 'running') or '0') == 0 then
    redis.call('HSET', KEYS[1], 'end_time', ARGV[1])
  end
end
return 1
