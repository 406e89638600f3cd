"""Lua scripts that keep Redis from ever holding an entry older than the one it has.

``FENCED_SET`` writes an entry only if its ``(version, rank)`` is not older than the current
entry's (see :mod:`sheetanchor.state._entry`). A slow backfill that read version 4 can
therefore never overwrite version 5 written by a later transaction, and a deletion's
tombstone keeps a backfill of the deleted row out.

``DELETE_IF_EQUAL`` removes an undecodable entry, so a corrupt header cannot fence out every
later backfill. ``LEASE_RELEASE`` deletes a lease only if it still holds our token, so a
holder whose lease expired can never release the next holder's lease.
"""

from __future__ import annotations

from sheetanchor.redis import LuaScript

__all__ = ["DELETE_IF_EQUAL", "FENCED_SET", "LEASE_RELEASE"]

# KEYS[1] entry key; ARGV[1] entry bytes, ARGV[2] version, ARGV[3] rank, ARGV[4] ttl ms.
# Returns 1 when written, 0 when a newer entry is there.
FENCED_SET = LuaScript(
    "fenced_set",
    """
local cur = redis.call('GET', KEYS[1])
if cur then
  local kind, ver = string.match(cur, '^([itv])(%d+)|')
  if kind then
    local rank = 1
    if kind == 'i' then rank = 0 elseif kind == 't' then rank = 2 end
    local cv = tonumber(ver)
    local nv = tonumber(ARGV[2])
    if cv > nv or (cv == nv and rank > tonumber(ARGV[3])) then
      return 0
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
return 1
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
