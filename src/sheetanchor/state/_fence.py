"""Lua scripts that keep Redis from ever holding an entry older than the one it has.

``FENCED_SET`` writes an entry only if its ``(version, rank)`` is not older than the current
entry's (see :mod:`sheetanchor.state._entry`). A slow backfill that read version 4 can
therefore never overwrite version 5 written by a later transaction, and a deletion's
tombstone keeps a backfill of the deleted row out.

The read path needs two round trips on a miss, like a naive read-through: ``GET_OR_LEASE``
returns the entry or, when there is none, tries to take the key's load lease in the same
call; ``FENCED_SET_RELEASE`` writes the backfill with the fence and releases the lease (only
if it still holds our token) in one call.

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
    "GET_OR_LEASE",
    "LEASE_RELEASE",
    "SCRIPTS",
]

# Sets `ok` to 0 when KEYS[1] holds an entry newer than (ARGV[2], ARGV[3]).
_FENCE = """
local ok = 1
local cur = redis.call('GET', KEYS[1])
if cur then
  local kind, ver = string.match(cur, '^([itv])(%d+)|')
  if kind then
    local rank = 1
    if kind == 'i' then rank = 0 elseif kind == 't' then rank = 2 end
    local cv = tonumber(ver)
    local nv = tonumber(ARGV[2])
    if cv > nv or (cv == nv and rank > tonumber(ARGV[3])) then
      ok = 0
    end
  end
end
if ok == 1 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
end
"""

# KEYS[1] entry key; ARGV[1] entry bytes, ARGV[2] version, ARGV[3] rank, ARGV[4] ttl ms.
# Returns 1 when written, 0 when a newer entry is there.
FENCED_SET = LuaScript("fenced_set", _FENCE + "return ok\n")

# KEYS[1] entry key, KEYS[2] lease key; ARGV[1..4] as FENCED_SET, ARGV[5] lease token.
FENCED_SET_RELEASE = LuaScript(
    "fenced_set_release",
    _FENCE
    + """
if redis.call('GET', KEYS[2]) == ARGV[5] then
  redis.call('DEL', KEYS[2])
end
return ok
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
SCRIPTS = (FENCED_SET, FENCED_SET_RELEASE, GET_OR_LEASE, LEASE_RELEASE, DELETE_IF_EQUAL)
