-- Move stored offsets forward (never back) to the next offsets of ARGV's (partition, first, next) triples.
local other = foreign(KEYS[K.stats], ARGV[A.incarnation])
if other then return other end
for o = NA + 1, #ARGV, 3 do
  local stored = tonumber(redis.call('HGET', KEYS[K.offsets], ARGV[o]) or '-1')
  if stored == nil or stored < tonumber(ARGV[o + 2]) then redis.call('HSET', KEYS[K.offsets], ARGV[o], ARGV[o + 2]) end
end
return 1
