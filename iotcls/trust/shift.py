"""Distribution shift on a dataset: the captures as a sensor sees them when a device's DHCP
exchange is not in them (a device that joined before the sensor started), or when the
network is slower.

:func:`without_dhcp` removes every DHCP record (DHCPv4 and DHCPv6) and rebuilds each
remaining record's history from the device's other records, exactly as the sensor would
have assembled it without those packets. :func:`dhcp_rows` tells, per matrix row, which
rows are DHCP flows (read back from the encoded row), for training's DHCP dropout.
:func:`stretched_timing` makes every gap between a flow's packets longer.
"""

from __future__ import annotations

import numpy as np

from ..dhcp import DHCP_PORTS
from ..layout import PORTS, UDP

DHCP6_PORTS = (546, 547)


def dhcp_rows(x: np.ndarray) -> np.ndarray:
    """(..., W) encoded rows -> (...) bool: the row is a DHCPv4 or DHCPv6 flow."""
    x = np.asarray(x)
    udp = x[..., UDP] > 0
    ports = np.rint(x[..., PORTS] * 65535.0)
    hit = np.zeros(x.shape[:-1], bool)
    for p in (*DHCP_PORTS, *DHCP6_PORTS):
        hit |= (ports == p).any(axis=-1)
    present = np.abs(x).sum(axis=-1) > 0
    return udp & hit & present


def remove_dhcp(
    matrices: np.ndarray, devices: np.ndarray, starts: np.ndarray, layout
) -> tuple[np.ndarray, np.ndarray]:
    """The records that are not DHCP flows (indices into ``matrices``) and their matrices
    as the sensor assembles them without the DHCP records: each history rebuilt from the
    device's (``devices``: one id per device session) other records by start."""
    keep = np.flatnonzero(~dhcp_rows(np.asarray(matrices)[:, 0]))
    if not len(keep):
        return keep, np.asarray(matrices)[keep]
    mats, order = layout.assemble(
        matrices[keep, 0], np.asarray(starts)[keep], np.asarray(devices)[keep]
    )
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return keep, mats[back]


def without_dhcp(ds):
    """The dataset ``ds`` (:class:`iotcls.dataset.Dataset`) with every DHCP record removed
    and the remaining matrices' histories rebuilt from the device's other records."""
    keys = np.char.add(np.char.add(ds.captures.astype(str), "|"), ds.devices.astype(str))
    keep, mats = remove_dhcp(ds.matrices, keys, ds.timestamps, ds.layout)
    out = ds.take(keep)
    out.matrices = mats
    return out


def stretched_timing(matrices: np.ndarray, layout, factor: float) -> np.ndarray:
    """``matrices`` with every packet's time offset ``factor`` times as large (servers
    farther away, a slower network), re-encoded as
    :meth:`iotcls.layout.MatrixLayout.encode_rows` encodes offsets. Offsets stretched past
    the window stay in the flow (a sensor would have split it): harsher than real."""
    cols = layout.group_slices()["timing"]
    v = np.asarray(matrices)[..., cols].astype(np.float64)
    out = np.array(matrices, np.float32, copy=True)
    out[..., cols] = np.where(v > 0, layout.timing_value(layout.offset_ms(v) * factor), 0.0)
    return out
