-- ARGV mode: 'check' answers whether the publish may go ahead; 'flip' checks and publishes; 'force'
-- publishes without looking at a pause (a shard of a model whose control `current` already moved on).
local current = redis.call('GET', KEYS[K.current])
if current ~= ARGV[A.expected] then return 0 end
local version, old = tonumber(ARGV[A.version]), tonumber(current)
if version <= old or redis.call('HGET', KEYS[K.new_meta], 'state') ~= 'building' then return 0 end
if #KEYS ~= NK + version - old then return redis.error_reply('publish needs the meta key of every version it retires') end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
-- A refresh that paused writers to the old version must publish before the pause runs out.
local paused_until = redis.call('HGET', KEYS[NK + 1], 'paused_until')
if ARGV[A.mode] ~= 'force' and paused_until and tonumber(now) >= tonumber(paused_until) then return 0 end
if ARGV[A.mode] == 'check' then return 1 end
redis.call('HSET', KEYS[K.new_meta], 'state', 'live', 'published_at', now)
redis.call('SET', KEYS[K.current], ARGV[A.version])
for v = old, version - 1 do
  redis.call('ZADD', KEYS[K.retired], now, v)
  local meta = KEYS[NK + 1 + v - old]
  if redis.call('EXISTS', meta) == 1 then redis.call('HSET', meta, 'state', 'retired', 'retired_at', now) end
end
return 1
