"""iotcls: real-time, trustworthy IoT device classification beside a Zeek sensor."""

import os

__version__ = "0.1.0"

# Torch's OpenMP threads spin while they wait for work by default. On a machine whose cores
# are shared (Zeek beside us, other jobs), a spinning thread that loses its core stalls every
# parallel region: measured on the 2-core VM under load, a training step took 2.6 s with
# spinning threads and 0.1 s with passive ones. Set before torch loads; a user's own setting
# wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
