if redis.call('GET', KEYS[K.current]) ~= ARGV[A.version] then return 'moved' end
if redis.call('EXISTS', KEYS[K.meta]) == 0 then return 'no_meta' end
local row_bytes = 4 * (tonumber(ARGV[A.k]) + 1)
local n_users, n_items, n_pairs = tonumber(ARGV[A.n_users]), tonumber(ARGV[A.n_items]), tonumber(ARGV[A.n_pairs])
local users, items, pair_items = split(ARGV[A.users], n_users), split(ARGV[A.items], n_items), split(ARGV[A.pair_items], n_pairs)

local user_rows, user_mask, err = gather_rows(KEYS[K.users], users, row_bytes)
if err then return err end
local item_rows, item_mask, err2 = gather_rows(KEYS[K.items], items, row_bytes)
if err2 then return err2 end
local user_counts, item_counts, pair_values = {}, {}, {}
for u = 1, n_users do user_counts[u] = redis.call('HLEN', KEYS[NK + u]) end
-- One shard sends the batch's items again (the same string): not split twice.
local count_items = ARGV[A.count_items] == ARGV[A.items] and items or split(ARGV[A.count_items], tonumber(ARGV[A.n_count_items]))
local counts = hmget_many(KEYS[K.item_counts], count_items)
for i, item in ipairs(count_items) do
  local count = counts[i]
  if count and not is_int(count) then
    return bad(KEYS[K.item_counts], 'field ' .. item .. ': not an integer: ' .. count)
  end
  item_counts[i] = count or '0'
end
-- Every interaction of the batch users with at most whole_limit of them (streammf.store.user_cache: a
-- writer that knows them all keeps the user): one HGETALL instead of the HMGET of the batch's pairs.
local whole_limit, whole_mask, whole_items, whole_values, whole = tonumber(ARGV[A.whole_limit]), {}, {}, {}, {}
for u = 1, n_users do
  local count = user_counts[u]
  if count <= whole_limit then
    whole_mask[u] = '1'
    local key, held = KEYS[NK + u], {}
    if count > 0 then
      local flat = redis.call('HGETALL', key)
      for f = 1, #flat, 2 do
        if not tonumber(flat[f + 1]) then return bad(key, 'field ' .. flat[f] .. ': not a number: ' .. flat[f + 1]) end
        held[flat[f]] = flat[f + 1]
        whole_items[#whole_items + 1] = flat[f]
        whole_values[#whole_values + 1] = flat[f + 1]
      end
    end
    whole[key] = held
  else
    whole_mask[u] = '0'
  end
end
-- Pairs: one HMGET per user's inter hash (not read whole above).
local pair_groups, inter_order = pairs_by_inter(n_pairs, ARGV[A.pair_inter_keys])
for _, key in ipairs(inter_order) do
  local positions, fields = pair_groups[key], {}
  for i, p in ipairs(positions) do fields[i] = pair_items[p] end
  local held = whole[key]
  local values = {}
  if held then
    for i, field in ipairs(fields) do values[i] = held[field] end
  else
    values = hmget_many(key, fields)
  end
  for i, p in ipairs(positions) do
    local value = values[i]
    if value and not tonumber(value) then
      return bad(key, 'field ' .. pair_items[p] .. ': not a number: ' .. value)
    end
    pair_values[p] = value or ''
  end
end
local stats = redis.call('HMGET', KEYS[K.stats], 'value_sum', 'value_count', 'writer')
local item_gramian, user_gramian = false, false
if ARGV[A.implicit] == '1' then
  item_gramian = redis.call('GET', KEYS[K.gram_items]) or false
  user_gramian = redis.call('GET', KEYS[K.gram_users]) or false
end
return {user_rows, user_mask, table.concat(user_counts, ','), item_rows, item_mask,
        table.concat(item_counts, ','), table.concat(pair_values, ','), stats[1], stats[2],
        item_gramian, user_gramian, stats[3] or '', table.concat(whole_mask), table.concat(whole_items, NUL),
        table.concat(whole_values, ',')}
