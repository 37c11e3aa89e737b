-- KEYS: an index set. ARGV: tag, batch size. Pops up to a batch of ids and
-- deletes their entries; returns {ids popped, deleted ids...}. Popping (not
-- reading then deleting the set) means an id added meanwhile is never lost.
-- Needs delete_entry.lua prepended.
local ids = redis.call('SPOP', KEYS[1], tonumber(ARGV[2]))
local out = {#ids}
for _, id in ipairs(ids) do
  if delete_entry(ARGV[1], id) then out[#out + 1] = id end
end
return out
