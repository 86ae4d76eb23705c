if redis.call('SET', KEYS[K.lease], ARGV[A.owner], 'NX', 'PX', ARGV[A.ttl_ms]) then return 1 end
if redis.call('GET', KEYS[K.lease]) == ARGV[A.owner] then redis.call('PEXPIRE', KEYS[K.lease], ARGV[A.ttl_ms]) return 1 end
return 0
