"""Early records (iotcls.schema.early_record): one per window, a prefix of the final record,
at the first moment when its first N packets are in or it has been idle for EARLY_IDLE_S."""

import pytest

from iotcls.schema import EARLY_IDLE_S, FlowRecord, early_cut, early_record


def rec(offsets, total=None, start=1000.0):
    n = len(offsets)
    return FlowRecord(
        device_mac="02:00:00:00:00:01", device_ip="10.0.0.2", device_port=40000,
        remote_ip="192.0.2.1", remote_port=443, proto=6, start=start,
        last=start + offsets[-1], total_bytes=100 * (total or n), total_packets=total or n,
        offsets=list(offsets), sizes=[100] * n, directions=[i % 2 for i in range(n)],
        payloads=[bytes([i]) for i in range(n)], uid="C1",
    )  # fmt: skip


def test_n_packets_in_without_a_gap():
    r = rec([0.1 * i for i in range(10)], total=250)
    e = early_record(r)
    assert e.total_packets == 10 and e.total_bytes == 1000 and e.offsets == r.offsets
    assert e.last == pytest.approx(r.start + 0.9) and e.start == r.start and e.uid == r.uid
    assert early_cut(r.offsets, 250) == (10, pytest.approx(0.9))


def test_an_idle_gap_cuts_before_n_packets():
    r = rec([0, 0.01, 0.02, 30.0, 30.1], total=5)  # DNS-like burst, then silence
    assert early_cut(r.offsets, 5) == (3, pytest.approx(0.02 + EARLY_IDLE_S))
    e = early_record(r)
    assert e.total_packets == 3 and e.sizes == [100] * 3 and e.payloads == r.payloads[:3]
    assert e.last == pytest.approx(r.start + 0.02)


def test_a_short_window_is_early_whole_after_the_idle_time():
    r = rec([0, 0.02], total=2)
    e = early_record(r)
    assert e.total_packets == 2 and e.offsets == r.offsets
    assert early_cut(r.offsets, 2) == (2, pytest.approx(0.02 + EARLY_IDLE_S))


def test_no_early_record_when_the_window_ends_first():
    steady = rec([float(i) for i in range(59)])  # a packet a second: never idle, < N packets
    assert early_record(steady, packets=100) is None  # idle from 58 s runs past the 60 s end
    assert early_record(rec([0.0, 0.5]), window_s=1.0) is None
    lone = early_record(rec([0, 59.0]))  # one packet, then 59 s of silence: early at 2 s
    assert lone.total_packets == 1 and lone.last == 1000.0
