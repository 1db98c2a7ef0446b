"""Moving a ZFS stream from one host to another, throttled and measured.

Sync mode copies a zvol NAS -> VM container once, then pulls it back
incrementally every few minutes and when the VM stops.  The original scripts
piped ``zfs send | pv -L | ssh host zfs receive`` and learnt nothing but an
exit status.  Here the bytes go through :func:`pump`, which holds the
operator's rate limit, counts what moved (for listings and ETAs), can be
cancelled, and never lets a receiver commit a stream whose producer failed.

* ``pump``: the copy loop, its token bucket and cancellation;
  ``progress``: what a running transfer has done, for listings.
* ``tcp`` (wire format in ``frames``): a one-shot endpoint admitted by a
  one-time token; the VM-container daemon opens a :class:`StreamServer`, the
  NAS connects with :class:`SocketSink` (upload) or :class:`SocketSource`
  (pull).  Data travel in length-prefixed frames with an explicit end frame,
  and the receiving end answers with a status line once its sink committed.
* ``ssh``, as the original roll did: :func:`ssh_source` / :func:`ssh_sink` run
  ``zfs send`` / ``zfs receive`` on the far host.

The names the daemons use are importable from here.
"""
from .frames import new_token
from .progress import Progress
from .pump import CHUNK, TransferCancelled, pump
from .ssh import SSH_OPTIONS, ssh_sink, ssh_source
from .tcp import SocketSink, SocketSource, StreamServer

__all__ = ["CHUNK", "Progress", "SSH_OPTIONS", "SocketSink", "SocketSource", "StreamServer",
           "TransferCancelled", "new_token", "pump", "ssh_sink", "ssh_source"]
