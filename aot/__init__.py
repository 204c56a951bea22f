"""Everything that asks the compiler: deviceless compiles for a TPU topology
(`compile_step`), plan search (`aot.plan.plan`), and the one reader of compiled HLO
(`aot.hlo`: loop trip counts, collectives, async pairs; `aot.costs`: FLOPs, HBM
bytes, collective bytes per device; `aot.schedule`: step time from the compiled
schedule, with collectives timed on the slice's torus). May import `train` and `infer`; neither imports it.
"""

from aot.compile import Report, compile_step, topology_devices
from aot.plan import Plan
