-- KEYS: hold, holds, n counters..., tokens-per-minute counters...
-- ARGV: cost, request_id, n, tokens reserved but not used, reaped ('1': the
--       reaper's provisional charge of an expired hold, '0': a reported cost)
local v = redis.call('HMGET', KEYS[1], 'state', 'held', 'reaped', 'cost')
if not v[1] then return {'GONE'} end
local last = 2 + tonumber(ARGV[3])
if v[1] == 'settled' then
  if v[3] ~= '1' or ARGV[5] ~= '0' then return {'SETTLED'} end
  -- A late Settle (or Release) replaces the reaper's charge, once.
  local delta = string.format('%d', tonumber(ARGV[1]) - tonumber(v[4]))
  for i = 3, last do redis.call('HINCRBY', KEYS[i], 'spent', delta) end
  redis.call('HSET', KEYS[1], 'reaped', '0', 'cost', ARGV[1])
  return {'CORRECTED', v[4]}
end
for i = 3, last do
  if v[1] == 'held' and v[2] ~= '0' then
    redis.call('HINCRBY', KEYS[i], 'reserved', '-' .. v[2])
  end
  redis.call('HINCRBY', KEYS[i], 'spent', ARGV[1])
end
-- Unused tokens go back to their minute, if that minute's counter still exists.
if ARGV[4] ~= '0' then
  for i = last + 1, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('DECRBY', KEYS[i], ARGV[4]) end
  end
end
redis.call('HSET', KEYS[1], 'state', 'settled', 'cost', ARGV[1], 'reaped', ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[2])
return {'OK', v[1]}
