"""Imported first by a rank's fork server started by exec (``workers.PRELOAD``), and by nothing
else.

The server is a child of the rank's main process; importing this arms its death signal before
it imports torch (seconds), so that a main process killed (``kill -9``) at any time takes the
server with it at once. The server's workers arm theirs toward the server
(``worker_entry.main``), so the chain reaches them too. (Without this, the server would still
end, but only after its imports, when it notices the main process's end: EOF on
multiprocessing's "alive" pipe.) Ctrl-C is ignored, as the workers ignore it: the main process
stops them. Torch-free on purpose.
"""

from __future__ import annotations

import signal

from hpc_asgd.worker_entry import arm_death_signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
arm_death_signal(0)  # toward whoever started the server (if it died already: see above)
