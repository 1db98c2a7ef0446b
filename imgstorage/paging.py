"""Listings too large for one reply travel in pages: the contract, on both sides.

A listing (``list_zvols``, ``list_dev``) is ordered by its key (the zvol name).
A request may carry ``after`` (the last key the caller already has) and
``limit`` (at most this many items); the reply carries ``more`` (whether items
follow) and, when they do, ``next`` (the key to send as ``after``).  A request
without either field gets the whole listing when it fits in one reply, which
is all the original's callers ever asked for; when it does not fit, it gets
as much as fits and ``more``, so a caller that reads ``more`` can always
finish, and one that does not at least sees a listing rather than an error.

Keys, not offsets, mark the place: a zvol added or removed between two pages
shifts no other item, so no item is listed twice or skipped because of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from . import naming, protocol
from .errors import ImgStorageError, ValidationError

# What a page may weigh: a reply's limit less room for the reply's own fields
# (action, status, more, and a ``next`` key of at most a few hundred bytes).
PAGE_BYTES = protocol.MAX_REPLY - 16 * 1024
MAX_LIMIT = 100_000             # a larger limit means nothing: no node holds that many
MAX_PAGES = 100_000             # a caller gives up on a listing that never ends

Body = Union[List[Dict[str, Any]], Dict[str, Dict[str, Any]]]


@dataclass(frozen=True)
class PageRequest:
    """Where a caller's page starts and how many items it wants (None: no say)."""

    after: Optional[str] = None
    limit: Optional[int] = None


@dataclass(frozen=True)
class Page:
    """Items of one page, in key order, and whether items follow them."""

    items: List[Tuple[str, Any]]
    more: bool

    @property
    def next(self) -> Optional[str]:
        return self.items[-1][0] if self.more and self.items else None

    def reply_fields(self) -> Dict[str, Any]:
        """``more``, and ``next`` when there is more: what a reply adds to its body."""
        fields: Dict[str, Any] = {"more": self.more}
        if self.more:
            fields["next"] = self.next
        return fields


# ------------------------------------------------------------------ node side
def page_request(message: Dict[str, Any]) -> PageRequest:
    """The paging fields of a request, checked; absent fields are no request at all."""
    after = message.get("after")
    if after is not None:
        after = naming.zvol_name(after)
    limit = message.get("limit")
    if limit is not None:
        limit = naming.non_negative_int("limit", limit, minimum=1, allow_none=False)
        if limit > MAX_LIMIT:
            raise ValidationError(f"invalid limit {limit}: at most {MAX_LIMIT}")
    return PageRequest(after, limit)


def take(items: Iterable[Tuple[str, Any]], request: PageRequest,
         budget: int = PAGE_BYTES) -> Page:
    """The page of ``items`` (key order) that starts after ``request.after``.

    A page stops at ``request.limit`` items or before it would weigh more than
    ``budget`` bytes, whichever comes first, but always holds one item when
    one follows, so a listing always moves on.
    """
    items = [(key, item) for key, item in items
             if request.after is None or key > request.after]
    if request.limit is None or len(items) <= request.limit:
        # most listings fit whole: weighed at once instead of item by item
        if protocol.encoded_size(dict(items)) <= budget:
            return Page(items, more=False)
    taken: List[Tuple[str, Any]] = []
    weight = 2                                  # the brackets of the body
    for key, item in items:
        cost = protocol.encoded_size(item) + protocol.encoded_size(key) + 4
        full = request.limit is not None and len(taken) >= request.limit
        if taken and (full or weight + cost > budget):
            return Page(taken, more=True)
        taken.append((key, item))
        weight += cost
    return Page(taken, more=False)


# ---------------------------------------------------------------- caller side
def fetch_all(ask: Callable[[Dict[str, Any]], Dict[str, Any]], message: Dict[str, Any], *,
              keyed: bool, malformed: Callable[[], ImgStorageError]) -> Body:
    """Every item of a listing, asking for page after page until none follows.

    ``ask`` sends one request and returns the reply; ``keyed`` says whether the
    body is an object keyed by name (``list_dev``) or a list of rows keyed by
    their ``zvol`` (``list_zvols``).  A page that does not move strictly past
    the previous one is a broken node, not a reason to ask forever.
    """
    rows: List[Dict[str, Any]] = []
    named: Dict[str, Dict[str, Any]] = {}
    cursor: Optional[str] = None
    for _ in range(MAX_PAGES):
        reply = ask(dict(message) if cursor is None else dict(message, after=cursor))
        keys = _page_keys(reply.get("body"), keyed, malformed)
        if cursor is not None and any(key is None or key <= cursor for key in keys):
            raise malformed()
        body = reply["body"]
        if keyed:
            named.update(body)
        else:
            rows.extend(body)
        if reply.get("more") is not True:
            return named if keyed else rows
        following = reply.get("next")
        if not isinstance(following, str) or not keys or None in keys \
                or following != max(k for k in keys if k is not None) \
                or (cursor is not None and following <= cursor):
            raise malformed()
        cursor = following
    raise malformed()


def _page_keys(body: Any, keyed: bool,
               malformed: Callable[[], ImgStorageError]) -> List[Optional[str]]:
    if keyed:
        if not isinstance(body, dict) or not all(isinstance(v, dict) for v in body.values()):
            raise malformed()
        return list(body)
    if not isinstance(body, list) or not all(isinstance(r, dict) for r in body):
        raise malformed()
    return [r.get("zvol") if isinstance(r.get("zvol"), str) else None for r in body]
