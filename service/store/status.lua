-- STATUS (POST /sms/status): a status callback's news for one outbound message, kept only if it
-- moves the message up (outbound.lua's ranks): callbacks arrive in any order, and a later
-- 'sent' never overwrites 'delivered'.
--
-- uses: common.lua tail.lua transcript.lua outbound.lua
-- KEYS[1..16], ARGV[1..8]: the conversation's keys and the store's settings (common.lua)
-- ARGV[9]  = the message's id (the callback URL's marker)
-- ARGV[10] = Twilio's MessageSid
-- ARGV[11] = its MessageStatus
-- ARGV[12] = its ErrorCode, or ''
-- ARGV[#ARGV] = TRANSCRIPT_MAX, or '' when transcripts are off (transcript.lua)
-- Returns the status kept before this callback and after it ('' and '' for an unknown message).
local id, message_sid, status, error_code = ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local raw = redis.call('HGET', sent, id .. ':s')
if not raw then return {'', ''} end
local state = cjson.decode(raw)
local before = state.status or 'pending'
if not moves_up(before, status) then return {before, before} end
state.status, state.updated_at = status, now_ms()
if not state.sid or state.sid == '' then state.sid = message_sid end
if error_code ~= '' then state.error_code = error_code end
redis.call('HSET', sent, id .. ':s', cjson.encode(state))
keep_sent()
transcribe_status(id, status, state.updated_at)
return {before, status}
