local current = redis.call('GET', KEYS[K.current])
if not current then return lost(KEYS[K.current], 'is missing: the model has no current version') end
local other = foreign(KEYS[K.stats], ARGV[A.incarnation])
if other then return other end
local user, k, implicit, n = ARGV[A.user], tonumber(ARGV[A.k]), ARGV[A.implicit] == '1', tonumber(ARGV[A.n_versions])
local live = nil
for v = 1, n do if ARGV[NA + v] == current then live = v end end
if not live then return 'stale_version' end  -- a version was published since the caller listed them
if paused(KEYS[NK + 4 * (live - 1) + 1]) then return 'paused' end
local refused = fence(KEYS[K.offsets], NA + n + 1)
if refused then return refused end

local interactions = redis.call('HGETALL', KEYS[K.inter])
local value_sum_delta = 0
for f = 2, #interactions, 2 do
  local value = tonumber(interactions[f])
  if not value then return bad(KEYS[K.inter], 'field ' .. interactions[f - 1] .. ': not a number') end
  value_sum_delta = value_sum_delta + value
end
local stats_sum = redis.call('HGET', KEYS[K.stats], 'value_sum')
if stats_sum and not tonumber(stats_sum) then return bad(KEYS[K.stats], 'field value_sum: not a number') end
local row_bytes, row_f, grams = 4 * (k + 1), '<' .. string.rep('f', k + 1), {}
for v = 1, n do
  local base = NK + 4 * (v - 1)
  local meta, rows, gram_key = KEYS[base + 1], KEYS[base + 2], KEYS[base + 3]
  local row = redis.call('EXISTS', meta) == 1 and redis.call('HGET', rows, user)
  if row and implicit then
    if #row ~= row_bytes then return bad(rows, 'field ' .. user .. ': ' .. #row .. ' bytes') end
    local gram = redis.call('GET', gram_key)
    if not gram then return lost(gram_key, 'is missing (implicit models keep a Gramian per version)') end
    if #gram ~= 8 * k * k then return bad(gram_key, 'holds ' .. #gram .. ' bytes') end
    local x, fmt, out = {struct.unpack(row_f, row)}, '<' .. string.rep('d', k), {}
    for r = 0, k - 1 do
      local g = {struct.unpack(fmt, gram, r * 8 * k + 1)}
      for c = 1, k do g[c] = g[c] - x[r + 1] * x[c] end
      out[r + 1] = struct.pack(fmt, unpack(g, 1, k))
    end
    grams[v] = table.concat(out)
  end
end

for v = 1, n do
  local base = NK + 4 * (v - 1)
  if redis.call('HDEL', KEYS[base + 2], user) == 1 and grams[v] then
    redis.call('SET', KEYS[base + 3], grams[v])
  end
  if redis.call('HGET', KEYS[base + 1], 'tracking') then redis.call('SADD', KEYS[base + 4], user) end
end
for f = 1, #interactions, 2 do
  if redis.call('HINCRBY', KEYS[K.item_counts], interactions[f], -1) <= 0 then
    redis.call('HDEL', KEYS[K.item_counts], interactions[f])
  end
end
redis.call('DEL', KEYS[K.inter])
redis.call('HSET', KEYS[K.stats], 'writer', '')  -- a writer's copy of this user is stale (user_cache)
if not implicit and #interactions > 0 then
  local value_sum = (tonumber(stats_sum) or 0) - value_sum_delta
  redis.call('HSET', KEYS[K.stats], 'value_sum', string.format('%.17g', value_sum))
  redis.call('HINCRBY', KEYS[K.stats], 'value_count', -(#interactions / 2))
end
for o = NA + n + 1, #ARGV, 3 do redis.call('HSET', KEYS[K.offsets], ARGV[o], ARGV[o + 2]) end
return 'applied'
