-- Puts back a hold Redis lost (cold start), unless its record exists.
-- KEYS: hold, holds, counters...   ARGV: amount, expire_at, record_ttl,
--       request_id, hold field pairs...
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[1] ~= '0' then
  for i = 3, #KEYS do redis.call('HINCRBY', KEYS[i], 'reserved', ARGV[1]) end
end
local fields = {}
for j = 5, #ARGV do table.insert(fields, ARGV[j]) end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
return 1
