-- A forgotten user's share of the stats copy of a shard that does not hold the user (explicit mode: the
-- global mean), fenced on offsets like every write. The user's shard does the rest (forget_user.lua).
local current = redis.call('GET', KEYS[K.current])
if not current then return lost(KEYS[K.current], 'is missing: the model has no current version') end
if current ~= ARGV[A.version] then return 'stale_version' end
local other = foreign(KEYS[K.stats], ARGV[A.incarnation])
if other then return other end
local refused = fence(KEYS[K.offsets], NA + 1)
if refused then return refused end
if paused(KEYS[K.meta]) then return 'paused' end
local stats_sum = redis.call('HGET', KEYS[K.stats], 'value_sum')
if stats_sum and not tonumber(stats_sum) then return bad(KEYS[K.stats], 'field value_sum: not a number') end
if ARGV[A.implicit] ~= '1' and tonumber(ARGV[A.value_count]) > 0 then
  local value_sum = (tonumber(stats_sum) or 0) - tonumber(ARGV[A.value_sum])
  redis.call('HSET', KEYS[K.stats], 'value_sum', string.format('%.17g', value_sum))
  redis.call('HINCRBY', KEYS[K.stats], 'value_count', -tonumber(ARGV[A.value_count]))
end
for o = NA + 1, #ARGV, 3 do redis.call('HSET', KEYS[K.offsets], ARGV[o], ARGV[o + 2]) end
return 'applied'
