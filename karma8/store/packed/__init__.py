"""The packed engine: a storage node keeps small parts as needles in append-only volumes.

A file per part costs an inode, a directory entry, a file-system block and two directory
changes per commit, more than a 4 KiB file's 820-byte part itself. Here parts of at most
``small_part_max`` bytes (:mod:`karma8.store.tiered` routes them) are appended to a few large
volume files, as Haystack and SeaweedFS do, and an in-memory index finds them.

Theory of operation
===================

Directory layout::

    root/
      volumes/<id:08d>.<gen>.<salt>.vol      a volume: needles back to back (8-byte aligned)
      volumes/<id:08d>.<gen>.<salt>.vol.tmp  a compaction's output being written (deleted
                                             on open)
      volumes/<id:08d>.<gen>.vol             a volume written before salts (read, deleted
                                             in and compacted; never appended to again)
      volumes/refused/<name>                 a volume set aside on open (below)
      volumes/lent                           the ids of the volumes lent to another process
                                             now, one per line (:mod:`.loans`)
      quarantine/<key>                       a quarantined part's payload, as a plain file

The salt is 8 random bytes (16 hex digits), chosen when the volume is created and kept by
every generation of it; it is in the name, not the file, so no damaged sector can lose it.
Opening deletes a volume's older generations (a compaction's source not unlinked yet) and
gives a free id to a volume whose id another of another salt has (a karma8 from before salts
run again on the directory creates ids it cannot see are taken). A volume none of whose
needles checks out under the salt its name gives, though whole needles are in it (renamed,
copied under another name, or damaged in every header), is no torn tail: it is moved to
``volumes/refused/`` whole, not cut, and its parts are missing until it is put back.

Appending (:mod:`~karma8.store.packed.store`). One volume is active, always the
highest-numbered, so that a key written again lands above every earlier copy of it (the
later wins on open): opening appends to the last volume again, unless it was lent to another
process when the node stopped (:mod:`~karma8.store.packed.loans`), and the first append
after a new volume was lent starts another. A commit takes its offset at the active volume's
end on the event loop, so appends to a volume never overlap, and hands the write (one
``pwrite`` of the whole needle) to the next group-sync round as a step
(:mod:`karma8.store.groupsync`): many commits share one thread trip and one ``syncfs``, and
none returns before its needle is durable. Only then does the index name it. A volume past
``volume_size`` is sealed and the next append opens a new one, so inodes stay few (1 GiB
volumes: one inode per GiB of small parts).

Deleting appends a tombstone to the volume *of the needle it deletes* (a sealed one
included), so a volume's needles and their tombstones always travel together, and the
part leaves the index once the tombstone is durable.

Needle format (:mod:`~karma8.store.packed.format`; integers big-endian)::

    offset   size  field
    0        4     magic b"K8ND"
    4        1     format version: 2 in a salted volume (1 in one from before salts)
    5        1     flags: 0 live part, 1 tombstone (deletes the key's needle before it in
                   the same volume)
    6        2     key length K (1..1024)
    8        8     payload length L (0 for a tombstone)
    16       4     CRC-32 of the payload
    20       32    sha256 of the payload (raw; zeros for a tombstone)
    52       4     check of bytes 0..51 then of the key (tells a damaged header): a
                   BLAKE2b MAC keyed by the volume's salt (4 bytes), the CRC-32 in a
                   volume from before salts
    56       K     the key, UTF-8
    56+K     L     the payload
    ...      0..7  zero padding to a multiple of 8 bytes

Recovery. There is no index file: opening scans every volume's needle headers (read in 1 MiB
windows) and applies them in file order. A needle counts if its header check holds and it
fits in the file; bytes that are not one (an append cancelled before its step ran leaves a
hole of zeros, a damaged header) are skipped to the next aligned magic. That magic may lie
inside a payload, whose bytes a client chose; the salt is why what it finds there is not
taken for a needle: a client can compute a CRC-32, not a MAC under a key it never sees.
After the last needle found the volume is truncated: those bytes were never acknowledged.
The last live needle must also match its payload CRC, else it is a torn append and is
truncated too. A damaged needle elsewhere stays indexed and fails its reads (its version is
then repaired, or collected as an orphan if it never committed). Why no index file (which
would spare reading sealed volumes' headers): it is a second thing to keep consistent with
the volumes through crashes and compaction, and the headers of a node's small parts are few
enough to scan (docs/architecture.md, "The packed engine").

Reading. An index entry names the volume, its generation, the offset, the length, the
payload's CRC-32 and sha256. Every read reads the whole payload (at most ``small_part_max``)
and checks its CRC before any byte is handed out (:class:`~karma8.core.errors.IntegrityError`
otherwise); ``verify`` (the scrubber) checks the sha256 too.

Compaction. A sealed volume whose garbage (bytes no live needle uses) passes
``compact_ratio`` is rewritten, in a worker thread, as its next generation with only its live
needles; appends carry on in the active volume meanwhile. Tombstones for parts deleted
during the copy are appended to the new file, which is fsynced and renamed into place; then,
on the event loop and with no checkpoint, the index moves to the new generation, and the old
file is unlinked. Reads that looked up the old generation hold its descriptor open until
they end (the file is unlinked, not gone), so a read of a needle being moved gets the right
bytes; deletes of the volume wait the few moments of the switch. A volume left with no live
needle is deleted. A crash before the rename leaves a ``.tmp`` (deleted on open); after it,
two generations, of which the newer wins.

Accounting. ``used_bytes`` counts live payload bytes (on open from the index), in the one
:class:`~karma8.store.quota.SpaceQuota` the routing store shares with the file engine;
headers, padding and garbage come on top until compaction.
"""
