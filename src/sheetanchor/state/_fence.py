"""Lua scripts that keep Redis from ever holding an entry older than the one it has.

``FENCED_SET`` writes an entry only if its ``(version, rank)`` is not older than the current
entry's (see :mod:`sheetanchor.state._entry`). A slow backfill that read version 4 can
therefore never overwrite version 5 written by a later transaction, and a deletion's
tombstone keeps a backfill of the deleted row out.

The read path needs two round trips on a miss, like a naive read-through: ``GET_OR_LEASE``
returns the entry or, when there is none, tries to take the key's load lease in the same
call; ``FENCED_SET_RELEASE`` writes the backfill with the fence and releases the lease (only
if it still holds our token) in one call. ``GET_OR_LEASE_MANY`` and
``FENCED_SET_RELEASE_MANY`` do the same for the keys of a ``get_many`` in one call each, on a
single server (their keys span hash slots: a cluster takes pipelines instead).

A backfill carries a deadline (Unix ms): past it, by the server's clock, the set is refused,
so a backfill held up on the way (a busy connection pool, a slow network) cannot land after
an entry it must not outlive expired. It relies on the client's and the server's clocks
agreeing to well within ``max_backfill_age``; the client also stops waiting at the deadline.

``DELETE_IF_EQUAL`` removes an undecodable entry, so a corrupt header cannot fence out every
later backfill. ``LEASE_RELEASE`` deletes a lease only if it still holds our token, so a
holder whose lease expired can never release the next holder's lease.

An entry and its lease share the ``{key}`` hash tag, so each script touches one cluster slot.
"""

from __future__ import annotations

from sheetanchor.redis import LuaScript

__all__ = [
    "DELETE_IF_EQUAL",
    "FENCED_SET",
    "FENCED_SET_RELEASE",
    "FENCED_SET_RELEASE_MANY",
    "GET_OR_LEASE",
    "GET_OR_LEASE_MANY",
    "LEASE_RELEASE",
    "SCRIPTS",
]

# The fence: `fenced(key, entry, version, rank, ttl)` writes the entry unless the key holds
# a newer one (1: written, 0: refused). `late(deadline)`: a backfill's deadline (Unix ms by
# the client's clock, 0: none) is past by the server's clock (TIME).
_FENCE_FNS = """
local function fenced(key, entry, nv, nr, ttl)
  local cur = redis.call('GET', key)
  if cur then
    local kind, ver = string.match(cur, '^([itv])(%d+)|')
    if kind then
      local rank = 1
      if kind == 'i' then rank = 0 elseif kind == 't' then rank = 2 end
      local cv = tonumber(ver)
      if cv > nv or (cv == nv and rank > nr) then
        return 0
      end
    end
  end
  redis.call('SET', key, entry, 'PX', ttl)
  return 1
end
local function late(deadline)
  if deadline == 0 then
    return false
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > deadline
end
"""

# KEYS[1] entry key; ARGV[1] entry bytes, ARGV[2] version, ARGV[3] rank, ARGV[4] ttl ms,
# ARGV[5] (optional) deadline, Unix ms. Returns 1 when written, 0 when a newer entry is
# there or the deadline is past.
FENCED_SET = LuaScript(
    "fenced_set",
    _FENCE_FNS
    + """
if late(tonumber(ARGV[5] or '0')) then
  return 0
end
return fenced(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4])
""",
)

# KEYS[1] entry key, KEYS[2] lease key; ARGV[1..4] as FENCED_SET, ARGV[5] lease token,
# ARGV[6] deadline (Unix ms, 0: none). The lease is released even when the set is refused.
FENCED_SET_RELEASE = LuaScript(
    "fenced_set_release",
    _FENCE_FNS
    + """
local ok = 0
if not late(tonumber(ARGV[6] or '0')) then
  ok = fenced(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4])
end
if redis.call('GET', KEYS[2]) == ARGV[5] then
  redis.call('DEL', KEYS[2])
end
return ok
""",
)

# The backfills of a get_many in one call (a single server: the keys span slots).
# KEYS[1..n] entry keys, then (with a token) KEYS[n+1..2n] their lease keys; ARGV[1] n,
# ARGV[2] lease token ('' : no leases), ARGV[3] deadline (Unix ms, 0: none), then four
# arguments per entry as FENCED_SET's ARGV[1..4]. Returns 1 (written) or 0 per entry; the
# leases that still hold our token are released in every case.
FENCED_SET_RELEASE_MANY = LuaScript(
    "fenced_set_release_many",
    _FENCE_FNS
    + """
local n = tonumber(ARGV[1])
local out = {}
local past = late(tonumber(ARGV[3]))
for i = 1, n do
  local ok = 0
  if not past then
    local a = 4 * i
    ok = fenced(KEYS[i], ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3])
  end
  out[i] = ok
  if ARGV[2] ~= '' and redis.call('GET', KEYS[n + i]) == ARGV[2] then
    redis.call('DEL', KEYS[n + i])
  end
end
return out
""",
)

# The misses of a get_many in one call (a single server: the keys span slots).
# KEYS[1..n] entry keys, KEYS[n+1..2n] their lease keys; ARGV[1] token, ARGV[2] lease ttl
# ms. Returns, per key, the entry bytes, or 1 (we hold its lease now) or 0 (another does).
# An entry no reader uses (an invalidation, a deletion's tombstone: they only fence) counts
# as none, so its key is loaded without another round trip for the lease.
GET_OR_LEASE_MANY = LuaScript(
    "get_or_lease_many",
    """
local n = #KEYS / 2
local out = {}
for i = 1, n do
  local v = redis.call('GET', KEYS[i])
  local kind, ver = nil, nil
  if v then
    kind, ver = string.match(v, '^([it])(%d+)|')
  end
  if v and not (kind == 'i' or (kind == 't' and tonumber(ver) > 0)) then
    out[i] = v
  elseif redis.call('SET', KEYS[n + i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
""",
)

# KEYS[1] entry key, KEYS[2] lease key; ARGV[1] token, ARGV[2] lease ttl ms.
# Returns the entry bytes, or 1 (we hold the lease now) or 0 (somebody else holds it).
GET_OR_LEASE = LuaScript(
    "get_or_lease",
    """
local v = redis.call('GET', KEYS[1])
if v then
  return v
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
""",
)

# KEYS[1] lease key; ARGV[1] token. Returns 1 when released.
LEASE_RELEASE = LuaScript(
    "lease_release",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""",
)

# KEYS[1] entry key; ARGV[1] the exact bytes seen. Removes a corrupt entry (whatever version
# its header claims) only if nobody replaced it meanwhile. Returns 1 when deleted.
DELETE_IF_EQUAL = LuaScript(
    "delete_if_equal",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""",
)

# Every script of the store: a server that lost one (restart, SCRIPT FLUSH) lost them all.
SCRIPTS = (
    FENCED_SET,
    FENCED_SET_RELEASE,
    FENCED_SET_RELEASE_MANY,
    GET_OR_LEASE,
    GET_OR_LEASE_MANY,
    LEASE_RELEASE,
    DELETE_IF_EQUAL,
)
