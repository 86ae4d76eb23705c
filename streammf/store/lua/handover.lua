if redis.call('GET', KEYS[K.current]) ~= ARGV[A.version] or redis.call('EXISTS', KEYS[K.meta]) == 0 then return 0 end
if ARGV[A.mark] == 'tracking' then
  redis.call('HSET', KEYS[K.meta], 'tracking', '1')
else
  local t = redis.call('TIME')
  local until_s = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[A.ttl_s])
  redis.call('HSET', KEYS[K.meta], 'paused_until', string.format('%.6f', until_s))
end
return 1
