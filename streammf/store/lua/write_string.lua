if not building(KEYS[K.meta]) then return 0 end
redis.call('SET', KEYS[K.target], ARGV[A.value])
return 1
