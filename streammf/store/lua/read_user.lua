-- A user's row in the version the caller expects, what the user has seen, and the global-mean stats;
-- 'moved' when that version is no longer current (the caller reads `current` again).
if redis.call('GET', KEYS[K.current]) ~= ARGV[A.version] then return 'moved' end
local row, mask, err = gather_rows(KEYS[K.users], {ARGV[A.user]}, 4 * (tonumber(ARGV[A.k]) + 1))
if err then return err end
local seen = {}
if mask == '1' and ARGV[A.with_seen] == '1' then seen = redis.call('HKEYS', KEYS[K.inter]) end
local stats = redis.call('HMGET', KEYS[K.stats], 'value_sum', 'value_count')
return {row, mask, table.concat(seen, NUL), #seen, stats[1], stats[2]}
