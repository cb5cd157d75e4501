"""The Lua scripts of ``RedisState``: each is one atomic step on Redis.

Conventions: every key is passed in ``KEYS`` (in the order of ``KEY_NAMES``),
times come from Redis' own clock (``TIME``, milliseconds), and every number a
script answers is an integer formatted as a string (``%d``): a Lua number is a
double, exact for the integers used here (below 2**53), and never crosses the
wire as a float.
"""

from __future__ import annotations

#: The keys every script receives, in this order (``KEYS[1]`` ...).
KEY_NAMES: tuple[str, ...] = (
    "epoch",  # 1  string: the id of this incarnation of the shared state
    "doc:emergency",  # 2  hash {v, body}
    "doc:limits",  # 3  hash {v, body}
    "log:emergency",  # 4  stream, entry id <version>-0, field body
    "log:limits",  # 5  stream
    "urls",  # 6  hash member -> url
    "seen",  # 7  hash member -> last seen (ms, Redis' clock)
    "exposure",  # 8  hash member -> gross exposure (decimal string)
    "applied:emergency",  # 9  hash member -> version applied
    "applied:limits",  # 10 hash member -> version applied
    "owners",  # 11 hash account -> member
    "forgotten",  # 12 set of members forgotten by an admin
    "credit",  # 13 hash member -> credit units
    "credit_seq",  # 14 hash member -> sequence of its last credit request
    "max_units",  # 15 string: the credit ceiling
    "recovering",  # 16 set of members still to re-assert their credit
)

_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(x) return string.format('%d', x) end
local function num(x) return tonumber(x) or 0 end
local function total_credit()
  local sum = 0
  local values = redis.call('HVALS', KEYS[13])
  for i = 1, #values do sum = sum + tonumber(values[i]) end
  return sum
end
local function list_members(now)
  local out = {}
  local urls = redis.call('HGETALL', KEYS[6])
  local owners = redis.call('HGETALL', KEYS[11])
  for i = 1, #urls, 2 do
    local name = urls[i]
    local accounts = {}
    for j = 1, #owners, 2 do
      if owners[j + 1] == name then accounts[#accounts + 1] = owners[j] end
    end
    local seen = redis.call('HGET', KEYS[7], name)
    local unseen = -1
    if seen then unseen = now - tonumber(seen) end
    out[#out + 1] = {
      name, urls[i + 1], accounts, int(unseen),
      int(num(redis.call('HGET', KEYS[13], name))),
      redis.call('HGET', KEYS[8], name) or '',
      int(num(redis.call('HGET', KEYS[9], name))),
      int(num(redis.call('HGET', KEYS[10], name))),
    }
  end
  return out
end
local function append_log(log, version, body)
  local id = int(version) .. '-0'
  local ok = pcall(redis.call, 'XADD', log, 'MAXLEN', '~', '1000', id, 'body', body)
  if not ok then
    -- The log is ahead of the document (the document was lost, the log was
    -- not): start it again from this version.
    redis.call('DEL', log)
    redis.call('XADD', log, id, 'body', body)
  end
end
"""

#: ARGV: name, url, alive_ms, epoch, account...
JOIN = (
    _PRELUDE
    + """
local name, url, alive_ms, epoch = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now = now_ms()
for i = 5, #ARGV do
  local owner = redis.call('HGET', KEYS[11], ARGV[i])
  if owner and owner ~= name then
    local seen = redis.call('HGET', KEYS[7], owner)
    if seen and now - tonumber(seen) <= alive_ms then
      return {'owned', ARGV[i], owner, redis.call('HGET', KEYS[6], owner) or ''}
    end
  end
end
local created = '0'
local stored = redis.call('GET', KEYS[1])
if not stored then
  redis.call('SET', KEYS[1], epoch)
  stored = epoch
  created = '1'
end
local wanted = {}
for i = 5, #ARGV do wanted[ARGV[i]] = true end
local owners = redis.call('HGETALL', KEYS[11])
for j = 1, #owners, 2 do
  if owners[j + 1] == name and not wanted[owners[j]] then
    redis.call('HDEL', KEYS[11], owners[j])
  end
end
for i = 5, #ARGV do redis.call('HSET', KEYS[11], ARGV[i], name) end
redis.call('HSET', KEYS[6], name, url)
redis.call('HSET', KEYS[7], name, int(now))
redis.call('SREM', KEYS[12], name)
return {'ok', stored, created}
"""
)

#: ARGV: name, exposure ('' to keep), applied emergency, applied limits.
BEAT = (
    _PRELUDE
    + """
local name = ARGV[1]
local now = now_ms()
local forgotten = redis.call('SISMEMBER', KEYS[12], name)
if forgotten == 0 then
  redis.call('HSET', KEYS[7], name, int(now))
  if ARGV[2] ~= '' then redis.call('HSET', KEYS[8], name, ARGV[2]) end
  redis.call('HSET', KEYS[9], name, ARGV[3])
  redis.call('HSET', KEYS[10], name, ARGV[4])
end
return {
  redis.call('GET', KEYS[1]) or '',
  int(num(redis.call('HGET', KEYS[2], 'v'))),
  int(num(redis.call('HGET', KEYS[3], 'v'))),
  int(forgotten),
  redis.call('SMEMBERS', KEYS[16]),
  int(num(redis.call('HGET', KEYS[13], name))),
  int(num(redis.call('HGET', KEYS[14], name))),
  int(num(redis.call('GET', KEYS[15]))),
  int(total_credit()),
  list_members(now),
}
"""
)

#: ARGV: document ('emergency' | 'limits'), expected version, body, max_units ('' to keep).
WRITE_DOCUMENT = (
    _PRELUDE
    + """
local doc, log = KEYS[2], KEYS[4]
if ARGV[1] == 'limits' then doc, log = KEYS[3], KEYS[5] end
local stored = num(redis.call('HGET', doc, 'v'))
if stored ~= tonumber(ARGV[2]) then return {'0', int(stored)} end
local version = stored + 1
redis.call('HSET', doc, 'v', int(version), 'body', ARGV[3])
append_log(log, version, ARGV[3])
if ARGV[4] ~= '' then redis.call('SET', KEYS[15], ARGV[4]) end
return {'1', int(version)}
"""
)

#: ARGV: document, version, body, max_units ('' to keep).
RESTORE_DOCUMENT = (
    _PRELUDE
    + """
local doc, log = KEYS[2], KEYS[4]
if ARGV[1] == 'limits' then doc, log = KEYS[3], KEYS[5] end
local stored = num(redis.call('HGET', doc, 'v'))
local version = tonumber(ARGV[2])
if stored >= version then return '0' end
redis.call('HSET', doc, 'v', int(version), 'body', ARGV[3])
append_log(log, version, ARGV[3])
if ARGV[4] ~= '' then redis.call('SET', KEYS[15], ARGV[4]) end
return '1'
"""
)

#: ARGV: name, seq, units, kind. The statement of ``ledger.decide_credit``.
CREDIT = (
    _PRELUDE
    + """
local name, seq, units, kind = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local stored = num(redis.call('HGET', KEYS[13], name))
local stored_seq = num(redis.call('HGET', KEYS[14], name))
local max_units = num(redis.call('GET', KEYS[15]))
local forgotten = redis.call('SISMEMBER', KEYS[12], name) == 1
if seq > stored_seq and not forgotten then
  local new = units
  if kind == 'increase' then
    if redis.call('SCARD', KEYS[16]) > 0 then
      new = stored
    else
      local room = max_units - (total_credit() - stored)
      new = math.max(stored, math.min(units, room))
    end
  end
  redis.call('HSET', KEYS[13], name, int(new))
  redis.call('HSET', KEYS[14], name, int(seq))
  if kind == 'reassert' then redis.call('SREM', KEYS[16], name) end
  stored, stored_seq = new, seq
end
return {
  int(stored), int(stored_seq), int(max_units), int(total_credit()),
  redis.call('SMEMBERS', KEYS[16]),
}
"""
)

#: ARGV: epoch, known member...
BEGIN_RECOVERY = """
local stored = redis.call('GET', KEYS[1])
if stored then return stored end
redis.call('SET', KEYS[1], ARGV[1])
for i = 2, #ARGV do redis.call('SADD', KEYS[16], ARGV[i]) end
return ARGV[1]
"""

#: ARGV: name, min_unseen_ms.
FORGET = (
    _PRELUDE
    + """
local name, min_unseen = ARGV[1], tonumber(ARGV[2])
if redis.call('HEXISTS', KEYS[6], name) == 0 then
  return {'err', 'no member ' .. name .. ' in the cluster'}
end
local seen = redis.call('HGET', KEYS[7], name)
if seen then
  local unseen = now_ms() - tonumber(seen)
  if unseen <= min_unseen then
    return {'err', 'member ' .. name .. ' was seen ' .. int(unseen) .. ' ms ago; it can be '
      .. 'forgotten once unreachable for more than ' .. int(min_unseen) .. ' ms'}
  end
end
for _, k in ipairs({6, 7, 8, 9, 10, 13, 14}) do redis.call('HDEL', KEYS[k], name) end
local owners = redis.call('HGETALL', KEYS[11])
for j = 1, #owners, 2 do
  if owners[j + 1] == name then redis.call('HDEL', KEYS[11], owners[j]) end
end
redis.call('SREM', KEYS[16], name)
redis.call('SADD', KEYS[12], name)
return {'ok'}
"""
)

#: No ARGV.
MEMBERS = (
    _PRELUDE
    + """
return list_members(now_ms())
"""
)
