if not building(KEYS[K.meta]) then return 0 end
for _, id in ipairs(split(ARGV[A.ids], tonumber(ARGV[A.n]))) do redis.call('HDEL', KEYS[K.rows], id) end
return 1
