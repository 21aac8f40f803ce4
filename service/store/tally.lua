-- Per tag, one-minute tallies in KEYS[9]: field '<minute><code>' (minute: epoch ms // 60000;
-- code m messages, s started, e o x h ended as expired, operator, opt-out, handler, d the ended
-- ones' ms, n their messages; service/lifecycle.py reads them), counted by HINCRBY, so that a
-- message costs one command and no parsing.

-- Adds `add` to the tally `code` of `minute`; true if that made the field, the first count of
-- its minute (then call `renew`).
local function count(minute, code, add)
  return add > 0 and redis.call('HINCRBY', minutes, minute .. code, add) == add
end

-- Forgets the minutes older than an hour and keeps the key an hour more. Also forgets the
-- records of versions before commit 694d48f (field 'minute % 60' = "<minute> <9 numbers>") once
-- theirs are: that match can go an hour after no such version runs.
local function renew(minute)
  local fields, doomed = redis.call('HGETALL', minutes), {}
  for i = 1, #fields, 2 do
    local at = string.match(fields[i], '^(%d+)%a$') or string.match(fields[i + 1], '^(%d+) ')
    if (tonumber(at) or 0) <= minute - 60 then doomed[#doomed + 1] = fields[i] end
  end
  delete(minutes, doomed)
  redis.call('PEXPIRE', minutes, 3660000)
end
