"""`python -m bench.unmetered serve`: the gateway with metering switched off, for the bench.

The bench runs it beside the gateway (target `gateway-unmetered`) to show what metering
costs: the same code and settings, with no completion metered, so no usage is read, no
charge recorded or written and no balance checked. It charges nothing, so it exists only
here, never as a setting of the gateway itself.
"""

from __future__ import annotations

import runpy

from gateway.proxy import route as proxy

# At import, not under __main__: `serve --workers N` spawns worker processes, and each
# imports this module again (as `__mp_main__`) before it runs the gateway.
proxy.METERED_PATHS = frozenset()

if __name__ == "__main__":
    # The gateway's own entry point; sys.modules["__main__"] stays this module, so that
    # spawned workers import it (and the line above) first.
    runpy.run_module("gateway", run_name="__main__")
