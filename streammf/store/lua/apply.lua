local current = redis.call('GET', KEYS[K.current])
if not current then return lost(KEYS[K.current], 'is missing: the model has no current version') end
if current ~= ARGV[A.version] then return 'stale_version' end
if redis.call('EXISTS', KEYS[K.meta]) == 0 then
  return lost(KEYS[K.meta], 'is missing: ' .. KEYS[K.current] .. ' names a version without meta')
end
local other = foreign(KEYS[K.stats], ARGV[A.incarnation])
if other then return other end
local tracking = redis.call('HGET', KEYS[K.meta], 'tracking')
-- A batch already begun on other shards (a model of several shards: the writer says so) finishes through
-- a pause: the refresh waits for such batches before it takes the changes, so none is left half applied.
-- Fenced before the pause: a batch already applied (or in conflict) writes nothing, so it need not wait.
-- ARGV tail: the interactions as (item, value) pairs grouped per user (pair_group_keys, pair_group_sizes),
-- then the (partition, first, next) offset triples.
local offsets_from = NA + tonumber(ARGV[A.n_pair_args]) + 1
local refused = fence(KEYS[K.offsets], offsets_from)
if refused then return refused end
if paused(KEYS[K.meta]) and ARGV[A.finishing] ~= '1' then return 'paused' end
-- The writer stamp (streammf.store.user_cache): a writer that took users from its own copy applies only if
-- nobody wrote since its read; every apply of users leaves its own stamp, or '' when another write came in
-- between. The stamp guards the users' rows, their interactions and the item counts: the item part of a
-- batch on a model of several shards touches none of them, and leaves it as it is.
local stamp_before = redis.call('HGET', KEYS[K.stats], 'writer') or ''
local stamp_kept = stamp_before == ARGV[A.stamp_expected]
if ARGV[A.stamp_strict] == '1' and not stamp_kept then return 'stale_version' end
local touches_users = ARGV[A.n_users] ~= '0' or ARGV[A.n_pairs] ~= '0' or ARGV[A.n_count_items] ~= '0'
-- Settled: nothing was written since the writer's read (its own stamp, still there), so the counts and
-- strengths it computed from that read are the stored ones plus its changes: taken as sent.
local settled = ARGV[A.stamp_expected] ~= '' and stamp_kept

local k = tonumber(ARGV[A.k])
local additive = ARGV[A.additive] == '1'
local n_users, n_items, n_pairs = tonumber(ARGV[A.n_users]), tonumber(ARGV[A.n_items]), tonumber(ARGV[A.n_pairs])
local users, items = split(ARGV[A.users], n_users), split(ARGV[A.items], n_items)

local row_f = '<' .. string.rep('f', k + 1)
local row_d = '<' .. string.rep('d', k + 1)
local row_bytes = 4 * (k + 1)
local base_bytes = 4 * k
local zero_bias = struct.pack('<f', 0)
local max_abs = tonumber(ARGV[A.max_abs_factor])
local function sound(row)  -- every coordinate finite and within ±max_abs (NaN fails the comparison)
  for c = 1, k + 1 do
    if not (math.abs(row[c]) <= max_abs) then return false end
  end
  return true
end
-- Items: stored (or base) float32 row + float64 delta, rounded to float32, like the twin. The writer sends
-- the row it read and the sum it computed from it: when the stored row is still that row (the usual
-- case: no other writer touched the item since the read), the sum is taken as is, which saves the Lua
-- arithmetic; otherwise (another replica wrote the item, or the writer did not read it) the sum is made
-- here from what is stored. Both ways give the same bytes.
-- As sent (`items_as_sent`, one shard): the writer's stamp is still there, so nothing was written since its
-- read and every stored row is the one it read: its sums are taken without reading the rows back or
-- sending the deltas (Lua hashes every byte of every string, so bytes not sent are time saved).
local item_order, new_rows, correction = {}, {}, nil
if ARGV[A.items_as_sent] == '1' then
  if not settled or ARGV[A.stamp_strict] ~= '1' then return 'stale_version' end
  if #ARGV[A.item_new_rows] ~= n_items * row_bytes then
    return bad(KEYS[K.items], 'update: ' .. #ARGV[A.item_new_rows] .. ' bytes of item rows for ' .. n_items .. ' items')
  end
  item_order = items
  for r = 1, n_items do new_rows[r] = string.sub(ARGV[A.item_new_rows], (r - 1) * row_bytes + 1, r * row_bytes) end
else
  local item_rows = {}
  local stored_rows = hmget_many(KEYS[K.items], items)
  local expected_mask = ARGV[A.item_expected_mask]
  -- Implicit: an item another writer changed since the read is written as stored + delta, not as the row
  -- the writer's Gramian change counts; the item Gramian then takes w·wᵀ − s·sᵀ − (n·nᵀ − o·oᵀ) too
  -- (streammf.store.contract.gramian_correction: same terms, same order). Lower triangle, mirrored below.
  local gram_before, gram_after = ARGV[A.item_gram_before], ARGV[A.item_gram_after]
  local gram_fix = gram_before ~= ''
  local zero_base = string.rep('\0', base_bytes)
  local base_f = '<' .. string.rep('f', k)
  local function add_outer(bytes, sign)
    local v = {struct.unpack(base_f, bytes)}
    for f = 1, k do
      local at, vf = (f - 1) * k, v[f]
      for h = 1, f do
        if sign > 0 then
          correction[at + h] = correction[at + h] + vf * v[h]
        else
          correction[at + h] = correction[at + h] - vf * v[h]
        end
      end
    end
  end
  for r = 1, n_items do
    local item = items[r]
    local first = item_rows[item] == nil
    local stored = item_rows[item]
    if first then
      stored = stored_rows[r]
      if stored and #stored ~= row_bytes then
        return bad(KEYS[K.items], 'field ' .. item .. ': ' .. #stored .. ' bytes, expected ' .. row_bytes ..
                   ' (k float32 factors + bias)')
      end
      item_order[#item_order + 1] = item
    end
    local expect = string.sub(expected_mask, r, r)
    local slice = (r - 1) * row_bytes
    if first and ((expect == '1' and stored == string.sub(ARGV[A.item_expected_rows], slice + 1, slice + row_bytes))
                  or (expect == '0' and not stored)) then
      item_rows[item] = string.sub(ARGV[A.item_new_rows], slice + 1, slice + row_bytes)
    else
      if not stored then
        stored = string.sub(ARGV[A.item_base], (r - 1) * base_bytes + 1, r * base_bytes) .. zero_bias
      end
      local row = {struct.unpack(row_f, stored)}
      local counted = stored_rows[r] and string.sub(stored, 1, base_bytes) or zero_base
      if not sound(row) then  -- damaged: the learner started this item again from its base row
        row = {struct.unpack(row_f, string.sub(ARGV[A.item_base], (r - 1) * base_bytes + 1, r * base_bytes) .. zero_bias)}
        counted = zero_base
      end
      local delta = {struct.unpack(row_d, ARGV[A.item_deltas], (r - 1) * 8 * (k + 1) + 1)}
      for c = 1, k + 1 do row[c] = row[c] + delta[c] end
      item_rows[item] = struct.pack(row_f, unpack(row, 1, k + 1))
      if gram_fix and first then
        local o = string.sub(gram_before, (r - 1) * base_bytes + 1, r * base_bytes)
        local n = string.sub(gram_after, (r - 1) * base_bytes + 1, r * base_bytes)
        local w = string.sub(item_rows[item], 1, base_bytes)
        if counted ~= o or w ~= n then
          if not correction then
            correction = {}
            for c = 1, k * k do correction[c] = 0 end
          end
          add_outer(w, 1)
          add_outer(counted, -1)
          add_outer(n, -1)
          add_outer(o, 1)
        end
      end
    end
  end
  for i, item in ipairs(item_order) do new_rows[i] = item_rows[item] end
end

-- Item counts m_j. One shard: the batch's items. Several: each shard counts the pairs of its own users
-- (where a pair's newness is known), so the count of j is the sum over the shards.
-- One shard sends the batch's items again (the same string): not split twice.
local count_items = ARGV[A.count_items] == ARGV[A.items] and items or split(ARGV[A.count_items], tonumber(ARGV[A.n_count_items]))
local count_order, new_counts = count_items, nil
if settled and ARGV[A.count_texts] ~= '' then  -- distinct items, their counts as the writer summed them
  new_counts = split(ARGV[A.count_texts], #count_items)
else
  local count_add = {}
  count_order = {}
  for r, item in ipairs(count_items) do
    if count_add[item] == nil then
      count_order[#count_order + 1] = item
      count_add[item] = 0
    end
    count_add[item] = count_add[item] + struct.unpack('<i8', ARGV[A.count_deltas], (r - 1) * 8 + 1)
  end
  local counts = hmget_many(KEYS[K.item_counts], count_order)
  new_counts = {}
  for i, item in ipairs(count_order) do
    local count = counts[i]
    if count and not is_int(count) then
      return bad(KEYS[K.item_counts], 'field ' .. item .. ': not an integer: ' .. count)
    end
    new_counts[i] = string.format('%d', (tonumber(count) or 0) + count_add[item])
  end
end

-- Interactions: implicit strengths add, explicit ratings replace; a pair repeated in one update
-- builds on its own earlier value. The writer sends the values to store, grouped per user (ratings
-- always; strengths summed from its read when settled): one HSET per user, no Lua per pair. Otherwise
-- one HMGET (implicit) and one HSET per user's inter hash, values made here.
local sent_pairs = ARGV[A.pair_group_keys] ~= '' and (settled or not additive)
local pair_groups, inter_order = {}, {}
if not sent_pairs then
  local pair_items = split(ARGV[A.pair_items], n_pairs)
  pair_groups, inter_order = pairs_by_inter(n_pairs, ARGV[A.pair_inter_keys])
  for _, key in ipairs(inter_order) do
    local group = {values = {}, order = {}, added = {}}
    for _, p in ipairs(pair_groups[key]) do
      local item, value = pair_items[p], struct.unpack('<d', ARGV[A.pair_values], 8 * p - 7)
      if group.values[item] == nil then
        group.order[#group.order + 1] = item
        group.values[item] = 0
      end
      if additive then  -- added in stream order, as the twin does: float addition is not associative
        group.added[item] = group.added[item] or {}
        table.insert(group.added[item], value)
      else
        group.values[item] = value
      end
    end
    pair_groups[key] = group
  end
end
if additive and not sent_pairs then
  for _, key in ipairs(inter_order) do
    local group = pair_groups[key]
    local stored = hmget_many(key, group.order)
    for i, item in ipairs(group.order) do
      local have = 0
      if stored[i] then
        have = tonumber(stored[i])
        if not have then return bad(key, 'field ' .. item .. ': not a number: ' .. stored[i]) end
      end
      for _, value in ipairs(group.added[item]) do have = have + value end
      group.values[item] = have
    end
  end
end

local stats = redis.call('HMGET', KEYS[K.stats], 'value_sum', 'value_count', 'events_applied', 'popularity_origin')
local value_sum = 0
if stats[1] then
  value_sum = tonumber(stats[1])
  if not value_sum then return bad(KEYS[K.stats], 'field value_sum: not a number: ' .. stats[1]) end
end
if stats[2] and not is_int(stats[2]) then
  return bad(KEYS[K.stats], 'field value_count: not an integer: ' .. stats[2])
end
if stats[3] and not is_int(stats[3]) then
  return bad(KEYS[K.stats], 'field events_applied: not an integer: ' .. stats[3])
end

-- Decayed item popularity, forward-decay form (streammf.model.popularity.batch_scale): the batch's last
-- event has clock events_applied + n - 1; scores are shrunk and the origin moved when weights grow large.
local popularity = ARGV[A.item_popularity] ~= ''
local pop_shrink, pop_origin, pop_scale = 1, 0, 1
if popularity then
  if stats[4] then
    pop_origin = tonumber(stats[4])
    if not pop_origin then return bad(KEYS[K.stats], 'field popularity_origin: not a number: ' .. stats[4]) end
  end
  local pop_type = redis.call('TYPE', KEYS[K.popularity])['ok']
  if pop_type ~= 'zset' and pop_type ~= 'none' then return bad(KEYS[K.popularity], 'is a ' .. pop_type .. ', not a zset') end
  local half_life = tonumber(ARGV[A.popularity_half_life])
  if half_life > 0 then
    local clock_last = tonumber(stats[3] or '0') + tonumber(ARGV[A.events_applied]) - 1
    local exponent = (clock_last - pop_origin) / half_life
    if exponent > 60 then  -- RESCALE_BITS
      pop_shrink, pop_origin = 2 ^ (-exponent), clock_last
    else
      pop_scale = 2 ^ exponent
    end
  end
end

-- Gramians: the same shortcut as the item rows (the writer sends the Gramian it read and its sum).
local function add_gramian(key, delta, expected, sum, extra)
  local stored = redis.call('GET', key)
  if not stored then return nil, lost(key, 'is missing (implicit models keep a Gramian per version)') end
  if #stored ~= 8 * k * k then
    return nil, bad(key, 'holds ' .. #stored .. ' bytes, expected ' .. 8 * k * k)
  end
  local fmt, out = '<' .. string.rep('d', k), {}
  local summed = expected ~= '' and stored == expected
  if summed and not extra then return sum, nil end
  for r = 0, k - 1 do
    local g
    if summed then
      g = {struct.unpack(fmt, sum, r * 8 * k + 1)}
    else
      g = {struct.unpack(fmt, stored, r * 8 * k + 1)}
      local d = {struct.unpack(fmt, delta, r * 8 * k + 1)}
      for c = 1, k do g[c] = g[c] + d[c] end
    end
    if extra then  -- the correction's lower triangle, read across for the upper one
      for c = 1, k do
        local f, h = r + 1, c
        if h > f then f, h = h, f end
        g[c] = g[c] + extra[(f - 1) * k + h]
      end
    end
    out[r + 1] = struct.pack(fmt, unpack(g, 1, k))
  end
  return table.concat(out), nil
end
local gramians = {}
for _, slot in ipairs({{K.gram_items, A.item_gramian_delta, A.item_gramian_expected, A.item_gramian_sum},
                       {K.gram_users, A.user_gramian_delta, A.user_gramian_expected, A.user_gramian_sum}}) do
  if ARGV[slot[2]] ~= '' then
    local extra = slot[1] == K.gram_items and correction or nil
    local blob, err = add_gramian(KEYS[slot[1]], ARGV[slot[2]], ARGV[slot[3]], ARGV[slot[4]], extra)
    if err then return err end
    gramians[#gramians + 1] = {KEYS[slot[1]], blob}
  end
end

-- Phase 2: everything checked; write.
-- The stamp first: rows written by a write that fails part-way are never taken as this writer's.
if touches_users then redis.call('HSET', KEYS[K.stats], 'writer', stamp_kept and ARGV[A.stamp_new] or '') end
local user_rows = {}
for u = 1, n_users do user_rows[u] = string.sub(ARGV[A.user_rows], (u - 1) * row_bytes + 1, u * row_bytes) end
hset_many(KEYS[K.users], users, user_rows)
hset_many(KEYS[K.items], item_order, new_rows)
hset_many(KEYS[K.item_counts], count_order, new_counts)
if sent_pairs then
  local groups, group_sizes, at = ARGV[A.pair_group_keys], ARGV[A.pair_group_sizes], NA + 1
  for g = 1, #groups / 4 do
    local key = KEYS[struct.unpack('<I4', groups, 4 * g - 3)]
    local last = at + 2 * struct.unpack('<I4', group_sizes, 4 * g - 3) - 1
    for first = at, last, 2 * CHUNK do
      redis.call('HSET', key, unpack(ARGV, first, math.min(first + 2 * CHUNK - 1, last)))
    end
    at = last + 1
  end
end
for _, key in ipairs(inter_order) do
  local group, texts = pair_groups[key], {}
  for i, item in ipairs(group.order) do texts[i] = string.format('%.17g', group.values[item]) end
  hset_many(key, group.order, texts)
end
redis.call('HSET', KEYS[K.stats], 'value_sum', string.format('%.17g', value_sum + tonumber(ARGV[A.value_sum_delta])))
redis.call('HINCRBY', KEYS[K.stats], 'value_count', ARGV[A.value_count_delta])
redis.call('HINCRBY', KEYS[K.stats], 'events_applied', ARGV[A.events_applied])
for _, g in ipairs(gramians) do redis.call('SET', g[1], g[2]) end
for o = offsets_from, #ARGV, 3 do redis.call('HSET', KEYS[K.offsets], ARGV[o], ARGV[o + 2]) end
if popularity then
  if pop_shrink ~= 1 then  -- rare (every 60 half-lives): one pass over the catalogue
    local scored = redis.call('ZRANGE', KEYS[K.popularity], 0, -1, 'WITHSCORES')
    for first = 1, #scored, 2 * CHUNK do
      local args = {}
      for i = first, math.min(first + 2 * CHUNK - 1, #scored), 2 do
        args[#args + 1] = string.format('%.17g', tonumber(scored[i + 1]) * pop_shrink)
        args[#args + 1] = scored[i]
      end
      redis.call('ZADD', KEYS[K.popularity], unpack(args))
    end
  end
  for r = 1, n_items do
    local weight = struct.unpack('<d', ARGV[A.item_popularity], 8 * r - 7) * pop_scale
    redis.call('ZINCRBY', KEYS[K.popularity], string.format('%.17g', weight), items[r])
  end
  redis.call('HSET', KEYS[K.stats], 'popularity_origin', string.format('%.17g', pop_origin),
             'popularity_half_life', ARGV[A.popularity_half_life])
end
if tracking then  -- a refresh is catching up with this version: tell it what changed
  sadd_many(KEYS[K.changed_users], users)
  sadd_many(KEYS[K.changed_items], item_order)
end
return 'applied'
