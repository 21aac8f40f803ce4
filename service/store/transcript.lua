-- Transcripts (TRANSCRIPTS=1): SAVE appends the message and its reply to the pair's transcript in
-- the same atomic step as it saves the state, so that a message is in the transcript exactly
-- when its state is saved (a redelivery, answered by OPEN from memory, writes nothing).
--
-- The transcript is `transcript` (tail.lua), its payload SAVE's ARGV[#ARGV - 1]: '' when
-- transcripts are off, else JSON [max entries, retention ms, entry, entry…], each entry a flat
-- list of field names and values (service/transcripts.py: payload).

-- Appends the payload's entries for conversation `sid` at `at` (the message's ms). The expiry
-- is the conversation's scheduled end plus the retention; an end moves it (ending.lua).
-- `starts`: the pair's new conversation drops the entries older than the retention.
-- `hold_left`: ms until an operator's hold ends, from which the conversation's time runs.
local function transcribe(payload, sid, at, starts, hold_left)
  if payload == '' then return end
  local given = cjson.decode(payload)
  local max, retention = given[1], given[2]
  if starts then
    redis.call('XTRIM', transcript, 'MINID', tonumber(at) - retention)
  end
  for i = 3, #given do
    redis.call('XADD', transcript, 'MAXLEN', max, '*', 'at', at, 'conv', sid, unpack(given[i]))
  end
  redis.call('PEXPIRE', transcript, hold_left + ttl_ms + retention)
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
