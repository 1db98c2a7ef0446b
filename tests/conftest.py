"""What every test process needs, whichever tier it runs."""
from __future__ import annotations

import signal
import threading

# A suite started in the background by a shell without job control inherits
# SIGINT ignored, and an ignored signal stays ignored across exec: every program
# a test interrupts as an operator's Ctrl-C would (imgstorageadmin at a prompt,
# a listing's watch=) would then go on until the test gives up.  The suite takes
# SIGINT as Python does, so the programs it starts get it as from a terminal.
if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
    signal.signal(signal.SIGINT, signal.default_int_handler)
