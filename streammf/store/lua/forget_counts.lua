-- A forgotten user's share of a shard that does not hold the user: the counts of its items here and, in
-- explicit mode, the copy of the stats; fenced on offsets like every write.
local current = redis.call('GET', KEYS[K.current])
if not current then return lost(KEYS[K.current], 'is missing: the model has no current version') end
if current ~= ARGV[A.version] then return 'stale_version' end
if paused(KEYS[K.meta]) then return 'paused' end
local refused = fence(KEYS[K.offsets], NA + 1)
if refused then return refused end
local stats_sum = redis.call('HGET', KEYS[K.stats], 'value_sum')
if stats_sum and not tonumber(stats_sum) then return bad(KEYS[K.stats], 'field value_sum: not a number') end
for _, item in ipairs(split(ARGV[A.items], tonumber(ARGV[A.n_items]))) do
  if redis.call('HINCRBY', KEYS[K.item_counts], item, -1) <= 0 then redis.call('HDEL', KEYS[K.item_counts], item) end
end
if ARGV[A.implicit] ~= '1' and tonumber(ARGV[A.value_count]) > 0 then
  local value_sum = (tonumber(stats_sum) or 0) - tonumber(ARGV[A.value_sum])
  redis.call('HSET', KEYS[K.stats], 'value_sum', string.format('%.17g', value_sum))
  redis.call('HINCRBY', KEYS[K.stats], 'value_count', -tonumber(ARGV[A.value_count]))
end
for o = NA + 1, #ARGV, 3 do redis.call('HSET', KEYS[K.offsets], ARGV[o], ARGV[o + 2]) end
return 'applied'
