-- A shard's own keys of a new model: its copy of `current`, the stats, version 1. Idempotent: returns the
-- incarnation the shard holds, so creators racing on a model of several shards all adopt the first shard's.
if redis.call('EXISTS', KEYS[K.current]) == 1 then
  return redis.call('HGET', KEYS[K.stats], 'incarnation') or ''
end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('SET', KEYS[K.current], '1')
redis.call('HSET', KEYS[K.stats], 'value_sum', '0', 'value_count', '0', 'events_applied', '0',
           'incarnation', ARGV[A.incarnation])
redis.call('HSET', KEYS[K.v1_meta], 'created_at', now, 'source', 'sgd', 'state', 'live', 'published_at', now)
if ARGV[A.zero_gramian] ~= '' then
  redis.call('SET', KEYS[K.v1_gram_items], ARGV[A.zero_gramian])
  redis.call('SET', KEYS[K.v1_gram_users], ARGV[A.zero_gramian])
end
return ARGV[A.incarnation]
