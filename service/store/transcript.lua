-- Transcripts (TRANSCRIPTS=1): SAVE appends the message and its reply to the pair's transcript in
-- the same atomic step as it saves the state, so that a message is in the transcript exactly
-- when its state is saved (a redelivery, answered by OPEN from memory, writes nothing).
--
-- The transcript is `transcript` (tail.lua), a list of JSON objects, one per entry (a list, not
-- a stream: a stream preallocates 4 KB per key, most of a short conversation's transcript). Its
-- payload is SAVE's ARGV[#ARGV - 1]: '' when transcripts are off, else lines: '<max entries>
-- <retention ms>', then each entry's JSON, which starts with '{"at":<ms>,' (service/transcripts.py:
-- payload; JSON carries no raw newline).

-- Appends the payload's entries. The expiry is the conversation's scheduled end plus the
-- retention; an end moves it (ending.lua). `at`: the message's ms. `starts`: the pair's new
-- conversation drops the entries older than the retention. `lasts`: ms from `at` to the
-- conversation's scheduled end (its own TTL, after an operator's hold if one runs).
-- `stamp`: the entries come without their time (push.lua's: Python does not know Redis' clock),
-- which is put first in each.
local function transcribe(payload, at, starts, lasts, stamp)
  if payload == '' then return end
  local lines = {}
  for line in string.gmatch(payload, '[^\n]+') do
    lines[#lines + 1] = (stamp and #lines > 0) and ('{"at":' .. at .. ',' .. string.sub(line, 2)) or line
  end
  local max, retention = string.match(lines[1], '^(%d+) (%d+)$')
  if starts then
    local oldest = tonumber(at) - retention
    while true do
      local first = redis.call('LINDEX', transcript, 0)
      local written = first and tonumber(string.match(first, '^{"at":(%d+)'))
      if not (first and (not written or written < oldest)) then break end
      redis.call('LPOP', transcript)
    end
  end
  redis.call('RPUSH', transcript, unpack(lines, 2))
  redis.call('LTRIM', transcript, -max, -1)
  redis.call('PEXPIREAT', transcript, tonumber(at) + lasts + retention)  -- as the index's score
end

-- The conversation's scheduled end moved from `expiry` to `moved_to` (ms): an end (to its time),
-- or an operator's hold (later). Its transcript's expiry moves by as much, so that it stays the
-- end plus the retention.
local function transcript_ends(expiry, moved_to)
  if not expiry or expiry == moved_to then return end
  local left = redis.call('PTTL', transcript)
  if left > 0 then
    redis.call('PEXPIRE', transcript, math.max(left + moved_to - expiry, 1))
  end
end

-- An outbound message's status moved to `status` at `now` (status.lua, finish.lua): an entry
-- '{"at":…,"dir":"status","id":…,"status":…}' when the pair has a transcript (the reader
-- shows it on the message's own entry). The scripts' last argument is TRANSCRIPT_MAX, or ''
-- when transcripts are off.
local function transcribe_status(id, status, now)
  local max = ARGV[#ARGV]
  if max == '' or redis.call('EXISTS', transcript) == 0 then return end
  redis.call('RPUSH', transcript, '{"at":' .. now .. ',"dir":"status","id":' .. cjson.encode(id) ..
             ',"status":' .. cjson.encode(status) .. '}')
  redis.call('LTRIM', transcript, -max, -1)
end
