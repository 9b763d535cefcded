"""No record lost between a real Zeek and a real ``iotcls serve`` (delivery.zeek): the bridge
killed (``kill -9``, its scorers with it) while records flow, offline and live; Zeek stopped
with SIGTERM while windows are open (the spool file, read back at the next start); and the
WebSocket over TLS with a certificate the bridge verifies (and one Zeek verifies)."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_port
from iotcls.testing.live import (
    PKG,
    Serve,
    Traffic,
    connects,
    counts,
    delivery_line,
    label_keys,
    log_rows,
    published_keys,
    wait_for,
)
from iotcls.testing.live import live_zeek as _live_zeek
from iotcls.testing.zeek import find_zeek

ZEEK = find_zeek()
needs_zeek = pytest.mark.zeek


# -- offline: the bridge killed twice ---------------------------------------------------------
def offline_zeek(tmp_path: Path, sample) -> tuple[Path, Path, Serve, subprocess.Popen]:
    """``zeek -r sample.pcap`` (final records only, a bridge waited for up to 120 s) beside a
    started ``iotcls serve``: Zeek's directory, its stderr file, the service and Zeek."""
    ws = free_port()
    zdir = tmp_path / "zeek"
    zdir.mkdir()
    serve = Serve(tmp_path, f"ws://127.0.0.1:{ws}/v1/messages/json").start()
    zerr = tmp_path / "zeek.err"
    macs = "IoTClass::device_macs={" + ",".join(f'"{m}"' for m in sample.macs) + "}"
    zeek = subprocess.Popen(
        [ZEEK, "-C", "-r", str(sample.pcap), str(PKG), macs, f"IoTClass::websocket_port={ws}/tcp"]
        + ["IoTClass::early_records=F", "IoTClass::hold_timeout=120sec"],
        cwd=zdir,
        stdout=subprocess.DEVNULL,
        stderr=zerr.open("w"),
    )
    return zdir, zerr, serve, zeek


def assert_each_labelled_once(zdir: Path, err: str) -> None:
    """Each of the sample's 288 records has exactly one line in iot_class.log."""
    keys = label_keys(log_rows(zdir / "iot_class.log"))
    assert len(keys) == len(set(keys)) == 288, (len(keys), len(set(keys)), err[-2000:])


@needs_zeek
def test_a_killed_bridge_loses_no_record_offline(tmp_path, sample):
    """``zeek -r sample.pcap`` beside ``iotcls serve``; the service is killed (``kill -9``,
    scorers and all) right after it connects, and again once labels are coming back, and
    restarted each time: Zeek publishes again what no bridge finished with, and every one of
    the 288 records has exactly one line in iot_class.log."""
    zdir, zerr, serve, zeek = offline_zeek(tmp_path, sample)
    try:
        wait_for(lambda: connects(zerr) >= 1, 120, "the first bridge", [zeek])
        time.sleep(0.3)
        serve.kill()  # records in its memory (held for the drain) are lost with it
        serve.start()
        wait_for(lambda: connects(zerr) >= 2, 120, "the second bridge", [zeek])
        # labels are being logged: kill it in the middle of them
        wait_for(
            lambda: log_rows(zdir / "iot_class.log") or zeek.poll() is not None,
            120,
            "the first labels",
        )
        killed_mid = zeek.poll() is None
        if killed_mid:
            serve.kill()
            serve.start()
        assert zeek.wait(300) == 0, zerr.read_text()[-3000:]
    finally:
        if zeek.poll() is None:
            zeek.kill()
        serve.stop()
    err = zerr.read_text()
    assert_each_labelled_once(zdir, err)
    assert "did not confirm" not in err and "the bridge received" not in err, err
    c = counts(delivery_line(err))
    assert c["kept"] == 288 and c["again"] > 0 and c["dropped"] == c["shed"] == 0, c
    # the drain is answered by the last serve; one killed just after answering it (the records
    # can all be labelled before the second kill) may not have written its line
    assert "drained: " in serve.text() or killed_mid


@needs_zeek
def test_a_bridge_gone_at_trace_end_is_waited_for(tmp_path, sample):
    """Offline, the bridge dies and the trace ends before another connects: Zeek waits
    (IoTClass::hold_timeout) for one instead of giving up; its hello gets every kept record
    published again, then the drain: each of the 288 records is labelled exactly once."""
    ws = free_port()
    zdir = tmp_path / "zeek"
    zdir.mkdir()
    serve = Serve(tmp_path, f"ws://127.0.0.1:{ws}/v1/messages/json").start()
    zerr = tmp_path / "zeek.err"
    macs = "IoTClass::device_macs={" + ",".join(f'"{m}"' for m in sample.macs) + "}"
    zeek = subprocess.Popen(
        [ZEEK, "-C", "-r", str(sample.pcap), str(PKG), macs, f"IoTClass::websocket_port={ws}/tcp"]
        + ["IoTClass::early_records=F", "IoTClass::hold_timeout=120sec"],
        cwd=zdir,
        stdout=subprocess.DEVNULL,
        stderr=zerr.open("w"),
    )
    try:
        wait_for(lambda: connects(zerr) >= 1, 120, "the first bridge", [zeek])
        serve.kill()
        # Zeek sees the bridge go, then reads the rest of the trace (well under a second);
        # whether it notices the loss before or after the trace's end, it must wait
        wait_for(lambda: "disconnected (code" in zerr.read_text(), 120, "the loss", [zeek])
        time.sleep(3)
        serve.start()
        assert zeek.wait(300) == 0, zerr.read_text()[-3000:]
    finally:
        if zeek.poll() is None:
            zeek.kill()
        serve.stop()
    err = zerr.read_text()
    assert_each_labelled_once(zdir, err)
    assert "were not classified" not in err and "did not confirm" not in err, err[-2000:]


# -- live: traffic on the loopback interface --------------------------------------------------
def live_zeek(*args, **kw):
    return _live_zeek(ZEEK, *args, **kw)


def _live_ok() -> None:
    if os.geteuid() != 0:
        pytest.skip("capturing on the loopback interface needs root")


@needs_zeek
def test_a_killed_bridge_loses_no_record_live(tmp_path):
    """A live ``zeek -i lo`` with 2 s windows, 60 device flows sending 5 packets a second
    each; ``iotcls serve`` is killed (``kill -9``) 4 s in and restarted: the records in its
    memory and those published while it was down are published again when the new one says
    hello, and every record Zeek published has exactly one label; every device packet is in
    one of them."""
    _live_ok()
    port, ws = free_port(), free_port()
    serve = Serve(tmp_path, f"ws://127.0.0.1:{ws}/v1/messages/json").start()
    zdir, pub = tmp_path / "zeek", tmp_path / "published.txt"
    zeek = live_zeek(
        zdir, port, ws, pub, "IoTClass::window_length=2sec", "udp_inactivity_timeout=3sec"
    )
    zerr = zdir / "zeek.err"
    traffic = Traffic(port, 60, 0.2)
    try:
        wait_for(
            lambda: connects(zerr) >= 1 and "listening on lo" in zerr.read_text(),
            120,
            "Zeek and the bridge",
            [zeek],
        )
        serve.ready()
        traffic.ticking(True)
        time.sleep(1)

        def kill_and_restart():
            serve.kill()
            serve.start()

        traffic.send_for(10, during=(5, kill_and_restart))
        # the flows end (3 s without a packet), their last windows end 2 s after they began
        wait_for(lambda: connects(zerr) >= 2, 120, "the second bridge", [zeek])
        time.sleep(8)
        n = len(published_keys(pub))
        wait_for(lambda: len(log_rows(zdir / "iot_class.log")) >= n, 60, "the labels", [zeek])
    finally:
        traffic.close()
        if zeek.poll() is None:
            zeek.send_signal(signal.SIGTERM)
        zeek.wait(60)
        serve.stop()
    err = zerr.read_text()
    published = published_keys(pub)
    keys = label_keys(log_rows(zdir / "iot_class.log"))
    assert len(keys) == len(set(keys)), "a record labelled twice"
    assert set(keys) == set(published), (len(keys), len(published), err[-2000:])
    assert sum(published.values()) == traffic.sent  # every device packet is in a record
    c = counts(delivery_line(err))
    assert c["kept"] == c["acked"] == len(published) >= 250, c
    # the first bridge labelled some, the second got the rest (some of them twice: dropped)
    assert 0 < c["again"] < c["kept"], c
    assert c["dropped"] == c["shed"] == c["spooled"] == 0, c


@needs_zeek
def test_zeek_stopped_with_open_windows_loses_nothing(tmp_path):
    """``zeekctl stop`` sends SIGTERM: the windows still open then (here every one: 60 s
    windows, 2 s of traffic) are flushed in zeek_done; they go to the spool file with
    whatever the bridge had not acknowledged, the next Zeek reads it back and publishes them
    when the bridge (which stayed up) says hello: every record is labelled once, late."""
    _live_ok()
    port, ws = free_port(), free_port()
    spool = tmp_path / "state" / "spool.json"
    serve = Serve(tmp_path, f"ws://127.0.0.1:{ws}/v1/messages/json").start()
    pub = tmp_path / "published.txt"
    first, second = tmp_path / "first", tmp_path / "second"
    zeek = live_zeek(first, port, ws, pub, f"IoTClass::spool_file={spool}")
    traffic = Traffic(port, 25, 0.2)
    zeek2 = None
    try:
        wait_for(
            lambda: (
                connects(first / "zeek.err") >= 1
                and "listening on lo" in (first / "zeek.err").read_text()
            ),
            120,
            "Zeek and the bridge",
            [zeek],
        )
        traffic.send_for(2)
        time.sleep(0.5)
        zeek.send_signal(signal.SIGTERM)
        assert zeek.wait(60) == 0
        published = published_keys(pub)
        assert len(published) == 25 and spool.exists()
        c1 = counts(delivery_line((first / "zeek.err").read_text()))
        assert c1["spooled"] == 25 - c1["acked"], c1
        assert len(spool.read_text().splitlines()) == c1["spooled"]
        zeek2 = live_zeek(
            second, port, ws, tmp_path / "published2.txt", f"IoTClass::spool_file={spool}"
        )
        wait_for(
            lambda: (
                len(log_rows(first / "iot_class.log")) + len(log_rows(second / "iot_class.log"))
                >= 25
            ),
            120,
            "the late labels",
            [zeek2],
        )
        time.sleep(1)
        zeek2.send_signal(signal.SIGTERM)
        assert zeek2.wait(60) == 0
    finally:
        traffic.close()
        for z in (zeek, zeek2):
            if z is not None and z.poll() is None:
                z.kill()
        serve.stop()
    err2 = (second / "zeek.err").read_text()
    keys = label_keys(log_rows(first / "iot_class.log") + log_rows(second / "iot_class.log"))
    assert len(keys) == len(set(keys)) == 25 and set(keys) == set(published), err2[-2000:]
    assert f"iotcls: {c1['spooled']} flow records read back from {spool}" in err2
    assert not spool.exists()  # read, then removed
    c2 = counts(delivery_line(err2))
    assert c2["kept"] == c2["acked"] == c1["spooled"] and c2["spooled"] == 0, c2


# -- TLS ----------------------------------------------------------------------------------------
def make_pki(d: Path) -> dict[str, Path]:
    """A CA, Zeek's certificate for 127.0.0.1 and the bridge's client certificate, signed
    by it; and a second CA that signed nothing here."""
    if not shutil.which("openssl"):
        pytest.skip("no openssl to make test certificates")
    d.mkdir(exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        run(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN=iotcls test {ca}",
        )
    for name, ext in (
        ("zeek", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("bridge", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{name}.ext").write_text(ext + "\n")
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return {p.stem if p.suffix == ".pem" else p.name: p for p in d.iterdir()}


@needs_zeek
def test_websocket_over_tls_with_verified_certificates(tmp_path, sample):
    """Zeek serves its WebSocket over TLS (IoTClass::websocket_tls, its own certificate and
    verification of its clients'); ``iotcls serve`` with a ``wss://`` URL checks Zeek's
    certificate against ``zeek.tls_ca`` and presents its own: every record is labelled. A
    bridge that trusts another CA, and one without a client certificate, get nothing."""
    from iotcls.bridge.zeek_ws import ZeekClient, tls_context

    pki = make_pki(tmp_path / "pki")
    ws = free_port()
    url = f"wss://127.0.0.1:{ws}/v1/messages/json"
    zdir = tmp_path / "zeek"
    zdir.mkdir()
    tls = (
        f'IoTClass::websocket_tls=[$cert_file="{pki["zeek"]}", '
        f'$key_file="{tmp_path / "pki" / "zeek.key"}", $enable_peer_verification=T, '
        f'$ca_file="{pki["ca"]}"]'
    )
    macs = "IoTClass::device_macs={" + ",".join(f'"{m}"' for m in sample.macs) + "}"
    zerr = tmp_path / "zeek.err"
    zeek = subprocess.Popen(
        [
            ZEEK,
            "-C",
            "-r",
            str(sample.pcap),
            str(PKG),
            macs,
            tls,
            f"IoTClass::websocket_port={ws}/tcp",
            "IoTClass::early_records=F",
            "IoTClass::hold_timeout=120sec",
        ],
        cwd=zdir,
        stdout=subprocess.DEVNULL,
        stderr=zerr.open("w"),
    )
    serve = None
    try:
        # the wrong CA, and no client certificate: no session, whatever is tried
        import asyncio

        async def attempt(ctx) -> bool:
            c = ZeekClient(url, ssl_context=ctx, ack_timeout_s=2, open_timeout_s=2)
            return await c._session()

        time.sleep(1)  # Zeek listens (it holds the trace for a bridge)
        assert not asyncio.run(attempt(tls_context(str(pki["other-ca"]))))
        assert not asyncio.run(attempt(tls_context(str(pki["ca"]))))  # no client certificate
        assert zeek.poll() is None and connects(zerr) == 0
        serve = Serve(
            tmp_path,
            url,
            tls_ca=str(pki["ca"]),
            tls_cert=str(pki["bridge"]),
            tls_key=str(tmp_path / "pki" / "bridge.key"),
        ).start()
        assert zeek.wait(300) == 0, zerr.read_text()[-3000:]
    finally:
        if zeek.poll() is None:
            zeek.kill()
        if serve is not None:
            serve.stop()
    keys = label_keys(log_rows(zdir / "iot_class.log"))
    assert len(keys) == len(set(keys)) == 288
    assert "drained: 288 records, 288 labels" in serve.text()
