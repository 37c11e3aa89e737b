-- KEYS: entry, key-model index, answer-model index, user index, stats, age, size.
-- ARGV: ttl, id, answer, model, answer_model, end_user, request_id, created_ms,
--       size, tag, scope, text, vec (the last three "" for an exact-only entry),
--       max entries, max bytes.
-- Returns {1 if this is a new store (counted) else 0, evicted ids...}.
-- Needs delete_entry.lua prepended.
local ttl = tonumber(ARGV[1])
local id, user, request_id = ARGV[2], ARGV[6], ARGV[7]
local prev = redis.call('HMGET', KEYS[1], 'request_id', 'end_user')
-- An overwrite for another end user: the old user's erasure must not reach it.
if prev[2] and prev[2] ~= '' and prev[2] ~= user then
  redis.call('SREM', ARGV[10] .. ':u:' .. prev[2], id)
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'answer', ARGV[3], 'model', ARGV[4], 'answer_model', ARGV[5],
  'end_user', user, 'request_id', request_id, 'created_ms', ARGV[8], 'size', ARGV[9])
if ARGV[11] ~= '' then
  redis.call('HSET', KEYS[1], 'scope', ARGV[11], 'text', ARGV[12], 'vec', ARGV[13])
end
redis.call('EXPIRE', KEYS[1], ttl)
local function index(key)
  redis.call('SADD', key, id)
  if redis.call('TTL', key) < ttl then redis.call('EXPIRE', key, ttl) end
end
index(KEYS[2])
if ARGV[5] ~= '' then index(KEYS[3]) end
if user ~= '' then index(KEYS[4]) end
local fresh = (not prev[1]) or request_id == '' or prev[1] ~= request_id
if fresh then
  redis.call('HINCRBY', KEYS[5], 'stores', 1)
  redis.call('HSETNX', KEYS[5], 'since_ms', ARGV[8])
end
forget_size(ARGV[10], id)
redis.call('ZADD', KEYS[6], tonumber(ARGV[8]), id)
redis.call('HSET', KEYS[7], id, ARGV[9])
local total = redis.call('HINCRBY', KEYS[7], '_total', tonumber(ARGV[9]))
local out = {fresh and 1 or 0}
local max_entries, max_bytes = tonumber(ARGV[14]), tonumber(ARGV[15])
while redis.call('ZCARD', KEYS[6]) > max_entries or total > max_bytes do
  local oldest = redis.call('ZRANGE', KEYS[6], 0, 0)[1]
  if oldest == nil or oldest == id then break end
  if delete_entry(ARGV[10], oldest) then out[#out + 1] = oldest end
  total = tonumber(redis.call('HGET', KEYS[7], '_total') or '0')
end
return out
