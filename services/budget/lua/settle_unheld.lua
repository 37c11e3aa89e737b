-- A request admitted while Redis was unreachable (fail open) has no hold;
-- its settled cost is added to spent once, recorded as a settled hold. A
-- charge the reaper made ('1') is replaced once by a reported one ('0').
-- KEYS: hold, holds, counters...
-- ARGV: cost, request_id, record_ttl, expire_at, reaped
local v = redis.call('HMGET', KEYS[1], 'state', 'held', 'reaped', 'cost')
if v[1] == 'settled' then
  if v[3] ~= '1' or ARGV[5] ~= '0' then return {'SETTLED'} end
  local delta = string.format('%d', tonumber(ARGV[1]) - tonumber(v[4]))
  for i = 3, #KEYS do redis.call('HINCRBY', KEYS[i], 'spent', delta) end
  redis.call('HSET', KEYS[1], 'reaped', '0', 'cost', ARGV[1])
  return {'CORRECTED', v[4]}
end
for i = 3, #KEYS do
  if v[1] == 'held' and v[2] ~= '0' then
    redis.call('HINCRBY', KEYS[i], 'reserved', '-' .. v[2])
  end
  redis.call('HINCRBY', KEYS[i], 'spent', ARGV[1])
end
if v[1] then
  redis.call('HSET', KEYS[1], 'state', 'settled', 'cost', ARGV[1], 'reaped', ARGV[5])
else
  redis.call('HSET', KEYS[1], 'state', 'settled', 'cost', ARGV[1], 'held', '0', 'keys', '[]',
    'expire_at', ARGV[4], 'unheld', '1', 'reaped', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
redis.call('ZREM', KEYS[2], ARGV[2])
return {'OK', v[1] or 'unheld'}
