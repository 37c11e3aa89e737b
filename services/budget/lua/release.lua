-- KEYS: hold, holds, counters...   ARGV: request_id, expired_before ('' = now)
local v = redis.call('HMGET', KEYS[1], 'state', 'held', 'expire_at')
if not v[1] then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'GONE'}
end
if v[1] ~= 'held' then return {v[1], v[2]} end
if ARGV[2] ~= '' and tonumber(v[3]) > tonumber(ARGV[2]) then return {'LIVE'} end
if v[2] ~= '0' then
  for i = 3, #KEYS do redis.call('HINCRBY', KEYS[i], 'reserved', '-' .. v[2]) end
end
redis.call('HSET', KEYS[1], 'state', 'released')
redis.call('ZREM', KEYS[2], ARGV[1])
return {'OK', v[2]}
