-- KEYS: meta, queue, leases, attempts, items. ARGV: now, lease seconds.
-- Returns {"item", id, request bytes, attempts} or {"busy"|"empty"|"done"}.
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'cancelled' or state == 'completed' then return {'done'} end
local now = tonumber(ARGV[1])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[3], id)  -- its replica died: run it again
  redis.call('LPUSH', KEYS[2], id)
  redis.call('HINCRBY', KEYS[1], 'running', -1)
  redis.call('HINCRBY', KEYS[4], id, 1)
end
local running = tonumber(redis.call('HGET', KEYS[1], 'running') or '0')
if running >= tonumber(redis.call('HGET', KEYS[1], 'max_concurrency')) then return {'busy'} end
local id = redis.call('LPOP', KEYS[2])
if not id then
  if running == 0 then return {'done'} end
  return {'empty'}
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), id)
redis.call('HINCRBY', KEYS[1], 'running', 1)
if state == 'queued' then redis.call('HSET', KEYS[1], 'state', 'running') end
return {'item', id, redis.call('HGET', KEYS[5], id), redis.call('HGET', KEYS[4], id) or '0'}
