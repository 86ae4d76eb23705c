-- The model's control keys, written after every shard's (open_shard): a model exists once its meta does.
if redis.call('EXISTS', KEYS[K.meta]) == 1 then return 0 end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('HSET', KEYS[K.meta], 'mode', ARGV[A.mode], 'k', ARGV[A.k], 'hyper', ARGV[A.hyper], 'layout_version', '1',
           'created_at', now)
if ARGV[A.shards] ~= '1' then
  redis.call('HSET', KEYS[K.meta], 'shards', ARGV[A.shards], 'shard_tags', ARGV[A.shard_tags])
end
redis.call('SET', KEYS[K.current], '1')
redis.call('SET', KEYS[K.next_version], '1')
return 1
