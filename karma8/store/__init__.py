"""The part store: a storage node's parts on a real disk.

This is net mode's :class:`karma8.ports.PartStore`; the simulator has its own, in memory
(:mod:`karma8.sim.disk`). An engine is a subpackage that implements the port:

- :mod:`karma8.store.files`, the file engine: one file per part (``FilePartStore``), for parts
  of any size. Each part costs an inode and at least one file-system block.
- :mod:`karma8.store.packed`, the packed engine: small parts as needles appended to a few large
  volume files with an index in memory, where a file per part would cost more in inodes,
  blocks and directory changes than the part itself.

:mod:`karma8.store.tiered` (``TieredPartStore``) is the port over both: parts of at most
``small_part_max`` bytes packed, the others files. Only it knows both engines.

What every engine can use lives beside them:

- :mod:`karma8.store.groupsync`: group commit, one ``syncfs`` for many writers' commits (also
  used by discovery's metadata syncs, :mod:`karma8.net.metasync`);
- :mod:`karma8.store.crc32`: the CRC of a run of blocks from the blocks' own CRCs;
- :mod:`karma8.store.diskio`: blocking calls from trio (a worker thread, or inline when small)
  and the mapping of ``OSError`` to karma8 errors;
- :mod:`karma8.store.quota`: committed and in-flight payload bytes against a capacity.

Rules, checked by import-linter (``pyproject.toml``): the store imports only ``karma8.core``,
``karma8.ports`` and itself, never net, sim, cli, actors, metadata or an HTTP package; net
wires it to a ``StorageNode``. Within an engine, writers and readers reach their store only
through its context object (the file engine's ``FileStoreContext``), never its private
attributes.
"""
