-- Rows of the given items in the version the caller expects (concatenated, with a '1'/'0' mask);
-- 'moved' when that version is no longer current.
if redis.call('GET', KEYS[K.current]) ~= ARGV[A.version] then return 'moved' end
local ids = split(ARGV[A.items], tonumber(ARGV[A.n]))
local rows, mask, err = gather_rows(KEYS[K.items], ids, 4 * (tonumber(ARGV[A.k]) + 1))
if err then return err end
return {rows, mask}
