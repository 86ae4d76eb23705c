if redis.call('HGET', KEYS[K.meta], 'state') ~= 'building' then return 0 end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('HSET', KEYS[K.meta], 'state', 'retired', 'retired_at', now)
redis.call('ZADD', KEYS[K.retired], now, ARGV[A.version])
return 1
