-- KEYS: hold, holds, ready, counters..., rate counters...
-- ARGV: amount, expire_at, record_ttl, request_id, n, n * (budget_id, limit,
--       soft, counter index or 0, counter expireat or 0), m, m * (name, limit,
--       increment, counter index, counter expireat), hold field pairs...
if redis.call('EXISTS', KEYS[3]) == 0 then return {'COLD'} end
local prior = redis.call('HMGET', KEYS[1], 'held', 'expire_at', 'state')
if prior[1] then return {'EXISTS', prior[1], prior[2], prior[3]} end
local amount = tonumber(ARGV[1])
local n = tonumber(ARGV[5])
local warnings = {}
for i = 0, n - 1 do
  local b = 6 + i * 5
  local idx = tonumber(ARGV[b + 3])
  local used = amount
  if idx > 0 then
    local v = redis.call('HMGET', KEYS[idx], 'spent', 'reserved')
    used = used + (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0)
  end
  if used > tonumber(ARGV[b + 1]) then
    if ARGV[b + 2] ~= '1' then return {'EXHAUSTED', ARGV[b], used - amount} end
    table.insert(warnings, ARGV[b])
    table.insert(warnings, used)
  end
end
local r0 = 6 + n * 5
local m = tonumber(ARGV[r0])
for i = 0, m - 1 do
  local b = r0 + 1 + i * 5
  local count = tonumber(redis.call('GET', KEYS[tonumber(ARGV[b + 3])]) or '0')
  if count + tonumber(ARGV[b + 2]) > tonumber(ARGV[b + 1]) then
    return {'RATE_LIMITED', ARGV[b], count}
  end
end
for i = 0, n - 1 do
  local b = 6 + i * 5
  local idx = tonumber(ARGV[b + 3])
  if idx > 0 then
    redis.call('HINCRBY', KEYS[idx], 'reserved', ARGV[1])
    if ARGV[b + 4] ~= '0' then redis.call('EXPIREAT', KEYS[idx], ARGV[b + 4]) end
  end
end
for i = 0, m - 1 do
  local b = r0 + 1 + i * 5
  local key = KEYS[tonumber(ARGV[b + 3])]
  redis.call('INCRBY', key, ARGV[b + 2])
  redis.call('EXPIREAT', key, ARGV[b + 4])
end
local fields = {}
for j = r0 + 1 + m * 5, #ARGV do table.insert(fields, ARGV[j]) end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
local out = {'OK'}
for _, w in ipairs(warnings) do table.insert(out, w) end
return out
