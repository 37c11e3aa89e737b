-- KEYS: meta, queue, leases, results, done. ARGV: id, result bytes, ok (1/0), cost, now, ttl.
-- Returns 1 when this was the batch's last item.
local leased = redis.call('ZREM', KEYS[3], ARGV[1])
if leased == 1 then
  redis.call('HINCRBY', KEYS[1], 'running', -1)
else
  redis.call('LREM', KEYS[2], 0, ARGV[1])  -- it was re-queued meanwhile: done now
end
if redis.call('HSETNX', KEYS[4], ARGV[1], ARGV[2]) == 1 then
  redis.call('ZADD', KEYS[5], 0, ARGV[1])
  redis.call('HINCRBY', KEYS[1], ARGV[3] == '1' and 'succeeded' or 'failed', 1)
  redis.call('HINCRBY', KEYS[1], 'cost', ARGV[4])
end
local state = redis.call('HGET', KEYS[1], 'state')
local running = tonumber(redis.call('HGET', KEYS[1], 'running') or '0')
if running > 0 or redis.call('LLEN', KEYS[2]) > 0 or state == 'completed' then return 0 end
if state ~= 'cancelled' then redis.call('HSET', KEYS[1], 'state', 'completed') end
if not redis.call('HGET', KEYS[1], 'end_time') then
  redis.call('HSET', KEYS[1], 'end_time', ARGV[5])
end
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
return 1
