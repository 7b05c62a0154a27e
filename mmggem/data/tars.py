"""How tar members become samples: webdataset's rules, taken from webdataset, for every reader.

The training loader, the evaluation reader and webdataset's own ``WebDataset`` pipeline must see
the same samples in a shard. So both readers use ``webdataset.tariterators`` itself:

- which members count: regular files, minus webdataset's metadata members (a top-level
  ``__name__`` member, or a name matching its ``skip_meta`` pattern, ``__*__`` at the start of
  the name; ``a/__x__/b.jpg`` is an ordinary member, as webdataset reads it);
- the key and extension: ``base_plus_ext`` (the key ends at the first dot of the base name, so
  ``a.b/c.d.jpg`` has key ``a.b/c`` and extension ``d.jpg``), extensions lower-cased;
- the grouping: ``group_by_keys`` (consecutive members with one key form a sample).

What webdataset does not give is kept here: a sample with two members of one extension is an
error in webdataset; training skips it and counts it (:data:`DUPLICATE_MEMBER`), evaluation
reports it as an error naming the shard and member.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Iterable, Iterator

from webdataset import tariterators

__all__ = ["DUPLICATE_MEMBER", "group_samples", "is_metadata", "member_key"]

DUPLICATE_MEMBER = "duplicate_member"
_SKIP_META = re.compile(inspect.signature(tariterators.tar_file_iterator).parameters["skip_meta"].default)
_BAD = "__bad__"  # webdataset's flag for a sample to drop (tariterators.valid_sample)


def is_metadata(name: str) -> bool:
    """Whether webdataset's tar reader skips the member ``name`` as metadata."""
    top_level = "/" not in name and name.startswith(tariterators.meta_prefix) and name.endswith(
        tariterators.meta_suffix)
    return top_level or _SKIP_META.match(name) is not None


def member_key(name: str) -> tuple[str, str] | None:
    """``(key, lower-cased extension)`` of a sample member as webdataset splits it; None when it is not one."""
    if is_metadata(name):
        return None
    key, extension = tariterators.base_plus_ext(name)
    return None if key is None else (key, extension.lower())


def group_samples(members: Iterable[tuple[str, Any]], url: str, *,
                  on_duplicate: Callable[[str, str], None] | None = None) -> Iterator[dict[str, Any]]:
    """Group ``(member name, value)`` pairs into samples with webdataset's ``group_by_keys``.

    ``value`` is whatever the reader keeps of a member (its bytes, or its TarInfo). Metadata
    members and names without an extension are left out as webdataset leaves them out. A second
    member of one extension in a sample calls ``on_duplicate(key, name)``: if it returns, the
    sample is dropped (flagged ``__bad__``, which webdataset drops); to stop, it raises. It is
    called once per sample, at its first duplicate.
    """
    def files() -> Iterator[dict[str, Any]]:
        key, seen, flagged = None, set(), False
        for name, value in members:
            parts = member_key(name)
            if parts is None:
                continue
            if parts[0] != key:
                key, seen, flagged = parts[0], set(), False
            if parts[1] in seen:
                if not flagged:
                    if on_duplicate is not None:
                        on_duplicate(key, name)
                    flagged = True
                    yield {"fname": f"{key}.{_BAD}", "data": True, "__url__": url}
                continue
            seen.add(parts[1])
            yield {"fname": name, "data": value, "__url__": url}

    return tariterators.group_by_keys(files())
