if not building(KEYS[K.meta]) then return 0 end
local n, row_bytes = tonumber(ARGV[A.n]), tonumber(ARGV[A.row_bytes])
for i, id in ipairs(split(ARGV[A.ids], n)) do
  redis.call('HSET', KEYS[K.rows], id, string.sub(ARGV[A.rows], (i - 1) * row_bytes + 1, i * row_bytes))
end
return 1
