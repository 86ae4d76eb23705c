-- The readers' switch of a sharded model: control `current` from `expected` to `version`.
if redis.call('GET', KEYS[K.current]) ~= ARGV[A.expected] then return 0 end
redis.call('SET', KEYS[K.current], ARGV[A.version])
return 1
