local NUL = string.char(0)
local function bad(key, what) return redis.error_reply('STOREERR ' .. key .. ' ' .. what) end
local function lost(key, what) return redis.error_reply('STORELOST ' .. key .. ' ' .. what) end
local function is_int(s) return string.match(s, '^%-?%d+$') ~= nil end
local function split(joined, n)
  local out, pos = {}, 1
  for i = 1, n - 1 do
    local stop = string.find(joined, NUL, pos, true)
    out[i] = string.sub(joined, pos, stop - 1)
    pos = stop + 1
  end
  if n > 0 then out[n] = string.sub(joined, pos) end
  return out
end
-- Offset fencing, exactly streammf.store.contract.fence: ARGV[from..] holds (partition, first, next) triples.
-- Returns nil when the update may be applied, else 'conflict', 'duplicate' or an error reply.
local function fence(offsets_key, from)
  local ahead, behind, overlap = false, false, false
  for o = from, #ARGV, 3 do
    local stored = redis.call('HGET', offsets_key, ARGV[o])
    if stored then
      local have = tonumber(stored)
      if not have then return bad(offsets_key, 'field ' .. ARGV[o] .. ': not a number: ' .. stored) end
      if have <= tonumber(ARGV[o + 1]) then ahead = true
      elseif have >= tonumber(ARGV[o + 2]) then behind = true
      else overlap = true end
    else
      ahead = true
    end
  end
  if overlap or (behind and ahead) then return 'conflict' end
  if behind then return 'duplicate' end
  return nil
end
-- A writer writes only into the model it attached to: not into one deleted and created again since
-- (`streammf run --rebuild` started elsewhere), where its offsets and rows would pass for the new
-- model's own. Models made before incarnations were kept have none: '' on both sides.
local function foreign(stats_key, incarnation)
  local stored = redis.call('HGET', stats_key, 'incarnation') or ''
  if stored == incarnation then return nil end
  return lost(stats_key, "field incarnation: '" .. stored .. "', not '" .. incarnation ..
              "' as when this writer attached: the model was deleted and created again since")
end
local function building(meta_key)  -- a version a refresh is still writing
  return redis.call('HGET', meta_key, 'state') == 'building'
end
local function paused(meta_key)  -- a refresh is handing this version over (writers wait)
  local paused_until = redis.call('HGET', meta_key, 'paused_until')
  if not paused_until then return false end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6 < tonumber(paused_until)
end
-- Multi-field commands in chunks: one call per chunk instead of one per field, and Lua's unpack() has a
-- stack limit (LUAI_MAXCSTACK, 8000) a big batch would pass.
local CHUNK = 500
local function hmget_many(key, fields)
  local out = {}
  for first = 1, #fields, CHUNK do
    local got = redis.call('HMGET', key, unpack(fields, first, math.min(first + CHUNK - 1, #fields)))
    for i = 1, #got do out[first + i - 1] = got[i] end
  end
  return out
end
local function hset_many(key, fields, values)  -- fields[i] = values[i]
  local n = #fields
  for first = 1, n, CHUNK do
    local args = {}
    for i = first, math.min(first + CHUNK - 1, n) do
      args[#args + 1] = fields[i]
      args[#args + 1] = values[i]
    end
    redis.call('HSET', key, unpack(args))
  end
end
local function sadd_many(key, members)
  for first = 1, #members, CHUNK do
    redis.call('SADD', key, unpack(members, first, math.min(first + CHUNK - 1, #members)))
  end
end
-- Pair positions 1..n grouped by their user's inter hash (`blob`: the KEYS index of each pair's hash, u32
-- little-endian), hashes in first-seen order: one multi-field command per user instead of one per pair.
local function pairs_by_inter(n, blob)
  local groups, order = {}, {}
  for p = 1, n do
    local key = KEYS[struct.unpack('<I4', blob, 4 * p - 3)]
    local group = groups[key]
    if not group then
      group = {}
      groups[key] = group
      order[#order + 1] = key
    end
    group[#group + 1] = p
  end
  return groups, order
end
local function gather_rows(key, ids, row_bytes)
  local rows, mask, zero = {}, {}, string.rep(NUL, row_bytes)
  local got = hmget_many(key, ids)
  for i, id in ipairs(ids) do
    local row = got[i]
    if row then
      if #row ~= row_bytes then
        return nil, nil, bad(key, 'field ' .. id .. ': ' .. #row .. ' bytes, expected ' .. row_bytes ..
                             ' (k float32 factors + bias)')
      end
      rows[i], mask[i] = row, '1'
    else
      rows[i], mask[i] = zero, '0'
    end
  end
  return table.concat(rows), table.concat(mask), nil
end
