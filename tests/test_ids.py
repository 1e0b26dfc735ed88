"""Version ids: unique, valid part-key prefixes, and in creation order (their first 13 hex
digits), so that the metadata's indexes on them grow at their end."""

from __future__ import annotations

import random
import re

from karma8.actors.storage import check_part_key
from karma8.net.serving import RandomIds
from karma8.sim.world import SimIds

VERSION_ID = re.compile(r"[0-9a-f]{21}")


def test_version_ids_are_unique_valid_and_in_creation_order() -> None:
    for ids in (RandomIds(), SimIds(random.Random(7))):
        made = [ids.new_version_id() for _ in range(5000)]
        assert all(VERSION_ID.fullmatch(v) for v in made)
        assert len(set(made)) == len(made)
        prefixes = [v[:13] for v in made]
        assert prefixes == sorted(prefixes)
        for version_id in made[:10]:
            check_part_key(f"{version_id}.4")  # a valid part key's prefix


def test_other_ids_stay_unordered_secrets() -> None:
    made = [RandomIds().new_id() for _ in range(200)]
    assert made != sorted(made)  # tokens and secrets are drawn, not counted
