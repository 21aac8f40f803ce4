-- INDEX_PAGE (the operators' view): up to `count` live entries (member, expiry) after
-- (expiry, member) in the shard's descending order, in one atomic step. The start is found by
-- rank: ZCOUNT gives the cursor's expiry group, a binary search in it the first member below
-- the cursor's (compared byte by byte, as Redis orders them; Lua's < follows the locale).
-- O(log N) whatever the shard's size, and right whether the cursor's own entry is still
-- there, moved or gone.
--
-- KEYS[1] = sms:active:{NN}  an index shard
-- ARGV[1] = the cursor's expiry (ms)
-- ARGV[2] = the cursor's member, '<from>|<to>'
-- ARGV[3] = now (ms): only entries that end later are live
-- ARGV[4] = how many entries at most
-- Returns a flat list: member, expiry, member, expiry, …
local key = KEYS[1]
local expiry, member, now, count = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local function below(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local lo = redis.call('ZCOUNT', key, '(' .. expiry, '+inf')
local hi = lo + redis.call('ZCOUNT', key, expiry, expiry)
while lo < hi do
  local mid = math.floor((lo + hi) / 2)
  if below(redis.call('ZRANGE', key, mid, mid, 'REV')[1], member) then hi = mid else lo = mid + 1 end
end
local found = redis.call('ZRANGE', key, lo, lo + count - 1, 'REV', 'WITHSCORES')
local live = {}
for i = 1, #found, 2 do
  if tonumber(found[i + 1]) <= now then break end
  live[#live + 1] = found[i]
  live[#live + 1] = found[i + 1]
end
return live
