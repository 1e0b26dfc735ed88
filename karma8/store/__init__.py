"""The part store: a storage node's parts on a real disk."""
