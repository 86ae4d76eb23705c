if redis.call('GET', KEYS[K.lease]) == ARGV[A.owner] then return redis.call('DEL', KEYS[K.lease]) end
return 0
