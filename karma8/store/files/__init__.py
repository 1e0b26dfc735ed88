"""The file engine: a storage node keeps each part as one file.

Theory of operation
===================

Directory layout (:mod:`~karma8.store.files.tree`)::

    root/
      tmp/<key>~<random>.tmp     writes in progress (deleted on start: they never committed)
      parts/<aa>/<bb>/<key>      committed parts; aa, bb = first 4 hex digits of blake2b(key)

Writing (:mod:`~karma8.store.files.writer`). A writer fills its own file in ``tmp/``, computing
the part's sha256 and block CRCs as the bytes go to disk. Its commit writes the trailer and the
header, creates the leaf directory if needed, hard-links the file into ``parts/aa/bb/`` and
unlinks the temporary name. The part counts as stored only once it is durable: with group sync
(Linux) once a ``syncfs`` that started after the link has completed
(:mod:`karma8.store.groupsync`; that round's thread runs the writing and linking as a step),
otherwise by fsyncing the file before the link and the new directories' parents and the leaf
after it. A commit whose round fails or is cancelled unlinks the part again. Link plus unlink
is a rename that refuses to replace: parts are immutable, so a second commit of a key fails
with :class:`~karma8.core.errors.UploadConflict` instead of swapping bytes under a reader.

Crashes. A part linked but not yet durable may survive a crash with incomplete bytes; it then
fails its header or checksums, and its version was never committed (discovery commits only
after every part is durable), so it is an orphan the node deletes. Temporaries are deleted on
start. Deleting a part fsyncs its leaf directory, so a deletion reported to discovery cannot
come back.

Part file format (:mod:`~karma8.store.files.format`; integers big-endian): a 96-byte header,
the payload, then a trailer of per-block checksums::

    offset   size  field
    0        6     magic b"K8PART"
    6        2     format version (2; version 1 is still read, see below)
    8        64    sha256 of the payload, lowercase hex, ASCII
    72       8     payload length L
    80       4     CRC-32 of header bytes 0..79 then 84..95 (tells a damaged header from
                   damaged data)
    84       4     block size B (65,536 = BLOCK)
    88       4     CRC-32 of the trailer (tells a damaged trailer from a damaged block)
    92       4     reserved, zero
    96       L     the payload
    96+L     4*n   trailer: CRC-32 of each B-byte block of the payload in order (the last block
                   may be short), n = ceil(L / B); nothing for an empty part

A temporary's first 96 bytes stay a hole (zeros) until its commit writes them, so a file
without the magic was never committed. Version 1 has the same first 80 bytes, a header CRC over
bytes 0..79 only, 12 reserved zero bytes and no trailer; it is still read (``verify`` and
whole-part reads check its sha256, a slice of it is not verified), never written.

Reading (:mod:`~karma8.store.files.reader`). Opening a part checks its header, that the file is
as long as the header says, and the trailer against its own CRC. Every read, of the whole part
or a slice, is widened to the whole blocks it touches, and each block's CRC is checked in the
worker thread that read it before any byte of it is handed out
(:class:`~karma8.core.errors.IntegrityError` otherwise), so no damaged byte leaves the node. The
sha256 is checked by :meth:`~karma8.store.files.store.FilePartStore.verify` (the scrubber) and
by the HTTP storage client, where bytes cross the network. A reader reads its next chunk ahead
in a worker thread while the current one is consumed.

Accounting (:mod:`karma8.store.quota`). ``used_bytes`` counts committed payload bytes, not
headers, trailers or block rounding: on start from file sizes (one ``stat`` per part; a
version-2 file of payload L is 96 + L + 4 * ceil(L / B) bytes, so a version-1 part counts 4
bytes per block short), then as a counter. ``capacity_bytes`` is a quota on payload bytes:
leave headroom below the disk's size for headers, block rounding and directories.

Threads (:mod:`karma8.store.diskio`). Blocking calls run in worker threads, except opening a
part, reading its header and trailer, and reads and writes of at most ``inline_io`` bytes.
Creating a temporary and every commit change directories, and always go to a thread. Writes
hop once per ``write_buffer`` bytes, reads once per ``read_chunk`` (whole blocks). A reader's
read-ahead is the one call nobody waits for: a reader closed while it runs hands the file
descriptor to that thread, which closes it after its ``pread``.

The store (:mod:`~karma8.store.files.store`) hands its writers and readers one
:class:`~karma8.store.files.context.FileStoreContext`; that is all they know of it. Why the
format and the fan-out are shaped so, and what they cost, is in docs/architecture.md ("Storage
on disk"); the measurements behind the settings are in docs/benchmarks.md.
"""
