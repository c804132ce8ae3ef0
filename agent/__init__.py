"""seal's process: model runtime, wake cycle, CLI. It drives ``policies``, ``adapters`` and ``store``.

A background service shares its machine: with torch's default OpenMP spinning, its
threads wait out every parallel region on a core another process holds, and a wake
cycle's work ran 10.6x slower beside one busy core (2 cores; ``seal bench busy``,
results/busy.json). A short spin before an idle thread sleeps costs 7% on an idle
machine (4.3 s against 4.0) and slows it 2.3x instead. It must be set before torch's OpenMP starts, so it is
set here, on import of the package, unless the environment already chose a policy.
"""

import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
