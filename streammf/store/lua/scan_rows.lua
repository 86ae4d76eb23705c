if redis.call('EXISTS', KEYS[K.meta]) == 0 then return 'gone' end
local reply = redis.call('HSCAN', KEYS[K.rows], ARGV[A.cursor], 'COUNT', ARGV[A.count])
local fields, row_bytes, ids, rows = reply[2], tonumber(ARGV[A.row_bytes]), {}, {}
for f = 1, #fields, 2 do
  if #fields[f + 1] ~= row_bytes then
    return bad(KEYS[K.rows], 'field ' .. fields[f] .. ': ' .. #fields[f + 1] .. ' bytes, expected ' .. row_bytes ..
               ' (k float32 factors + bias)')
  end
  ids[#ids + 1] = fields[f]
  rows[#rows + 1] = fields[f + 1]
end
return {reply[1], #ids, table.concat(ids, NUL), table.concat(rows)}
