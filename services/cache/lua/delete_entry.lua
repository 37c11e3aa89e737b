-- Deletes one entry and its index memberships; true if it existed.
-- Prepended to put.lua, delete.lua and drain.lua, which call delete_entry.
local function forget_size(tag, id)
  redis.call('ZREM', tag .. ':age', id)
  local size = redis.call('HGET', tag .. ':size', id)
  if size then
    redis.call('HDEL', tag .. ':size', id)
    redis.call('HINCRBY', tag .. ':size', '_total', -tonumber(size))
  end
end
local function delete_entry(tag, id)
  local key = tag .. ':e:' .. id
  local meta = redis.call('HMGET', key, 'model', 'answer_model', 'end_user')
  forget_size(tag, id)
  if redis.call('DEL', key) == 0 then return false end
  if meta[1] then redis.call('SREM', tag .. ':m:' .. meta[1], id) end
  if meta[2] and meta[2] ~= '' then redis.call('SREM', tag .. ':m:' .. meta[2], id) end
  if meta[3] and meta[3] ~= '' then redis.call('SREM', tag .. ':u:' .. meta[3], id) end
  return true
end
