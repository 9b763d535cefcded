"""``iotcls report``: reading iot_class.log back, the inventory, and the page in a real browser."""

import base64
import gzip
import io
import json
import shutil
import struct
import subprocess
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest

from iotcls.cli import main
from iotcls.inventory import build_inventory
from iotcls.logread import LogReadError, read_log, read_logs
from iotcls.logschema import FIELD_NAMES, LogEntry, LogWriter

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def sample_logs(tmp_path_factory, sample):
    """The sample capture classified into both log formats, as `make run` does."""
    out = tmp_path_factory.mktemp("logs")
    for fmt in ("zeek", "json"):
        args = ["classify", str(sample.pcap), "--devices", sample.devices_arg, "-o", str(out / fmt)]
        assert main(args + ["--format", fmt]) == 0
    return out / "zeek" / "iot_class.log", out / "json" / "iot_class.log"


class Page(HTMLParser):
    """The device table's rows (cell texts by class) and the pictures of a report."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []
        self.images: dict[str, str] = {}
        self._row: dict | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "device" in (a.get("class") or "").split():
            self._row = {"key": a["data-key"], "class": a["class"]}
            self.rows.append(self._row)
        elif tag == "td" and self._row is not None:
            self._cell = a.get("class") or f"col{len(self._row)}"
            self._row[self._cell] = ""
        elif tag == "img":
            self.images[a["id"]] = a["src"]

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        elif tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._row is not None and self._cell is not None:
            self._row[self._cell] += data


def parse_page(text: str) -> Page:
    p = Page()
    p.feed(text)
    return p


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_both_formats_read_the_same(sample_logs):
    zeek, js = (list(read_log(p)) for p in sample_logs)
    assert len(zeek) == len(js) > 100
    for a, b in zip(zeek, js):
        for name in FIELD_NAMES:
            va, vb = a[name], b[name]
            if name == "reason" and va is None:
                va = "-"  # classify's JSON keeps "-"; its ASCII writer marks it unset
            if isinstance(va, float):
                # ASCII carries six decimals, JSON the whole double
                assert va == pytest.approx(vb, abs=1e-6), (name, a.line)
            else:
                assert va == vb, (name, a.line)


def test_writer_round_trip(tmp_path):
    """Every column, with the characters the ASCII writer escapes, reads back as written."""
    e = LogEntry(
        ts=1700000000.25,
        uid="Cx",
        orig_h="10.0.0.2",
        orig_p=5000,
        resp_h="fe80::1",
        resp_p=53,
        proto="udp",
        device_mac="aa:bb:cc:dd:ee:ff",
        device_ip="10.0.0.2",
        label="Cam\twith, odd\\chars",
        confidence=0.5,
        strategy="sequence",
        n_flows=3,
        trusted=False,
        reason="low_confidence",
        top_groups=["payload=1.00", "a,b"],
        model="m@1",
    )
    empty = LogEntry(
        ts=1700000001.0,
        uid="Cy",
        orig_h="10.0.0.3",
        orig_p=1,
        resp_h="10.0.0.1",
        resp_p=2,
        proto="tcp",
        device_mac="",
        device_ip="10.0.0.3",
        label="",
        confidence=1.0,
        strategy="flow",
        n_flows=1,
    )
    for fmt in ("zeek", "json"):
        path = tmp_path / f"{fmt}.log"
        with path.open("w") as f:
            w = LogWriter(f, fmt)
            w.write(e)
            w.write(empty)
            w.close()
        got = list(read_log(path))
        assert [r.values["ts"] for r in got] == [e.ts, empty.ts]
        for entry, row in zip((e, empty), got):
            for name, v in zip(FIELD_NAMES, entry.values()):
                if (name, v) in (("device_mac", ""), ("reason", "-")) and fmt == "zeek":
                    assert row[name] is None  # written as the unset marker, as Zeek does
                elif name == "device_mac" and v == "":
                    assert row[name] is None  # JSON: omitted, as Zeek omits an unset field
                else:
                    assert row[name] == v, (fmt, name)


def test_inventory_of_the_sample(sample_logs, sample):
    devices = build_inventory(read_logs([sample_logs[0]]))
    assert {d.mac for d in devices} == set(sample.devices)
    right = sum(d.label == sample.devices[d.mac] for d in devices)
    assert right >= 7, [(d.mac, d.label) for d in devices]
    for d in devices:
        assert d.first_seen <= d.last_seen and d.entries == sum(d.labels.values())
        assert d.ips and "0.0.0.0" not in d.ips
        assert [h[0] for h in d.history] == sorted(h[0] for h in d.history)


def test_inventory_counts_changes_and_keys_by_ip_without_mac(tmp_path):
    path = tmp_path / "iot_class.log"
    rows = [  # (ts, mac, ip, label, trusted)
        (10.0, "aa:00:00:00:00:01", "0.0.0.0", "Cam", True),
        (20.0, "aa:00:00:00:00:01", "10.0.0.1", "Plug", False),
        (30.0, "aa:00:00:00:00:01", "10.0.0.9", "Cam", True),
        (15.0, "", "10.0.0.2", "<Hub>", False),
    ]
    with path.open("w") as f:
        w = LogWriter(f, "json")
        for ts, mac, ip, label, trusted in rows:
            w.write(
                LogEntry(
                    ts=ts,
                    uid="C",
                    orig_h=ip,
                    orig_p=1,
                    resp_h="1.1.1.1",
                    resp_p=2,
                    proto="udp",
                    device_mac=mac,
                    device_ip=ip,
                    label=label,
                    confidence=0.9,
                    strategy="sequence",
                    n_flows=1,
                    trusted=trusted,
                    reason="-" if trusted else "low_confidence",
                )
            )
    devices = {d.key: d for d in build_inventory(read_logs([path]))}
    cam = devices["aa:00:00:00:00:01"]
    assert (cam.label, cam.label_changes, cam.entries, cam.trusted) == ("Cam", 2, 3, True)
    assert cam.ips == ["10.0.0.1", "10.0.0.9"] and (cam.first_seen, cam.last_seen) == (10, 30)
    hub = devices["10.0.0.2"]
    assert (hub.mac, hub.trusted, hub.reason) == ("", False, "low_confidence")

    out = tmp_path / "r.html"
    assert main(["report", str(path), "-o", str(out)]) == 0
    text = out.read_text()
    assert "&lt;Hub&gt;" in text and "<Hub>" not in text
    page = parse_page(text)
    by_key = {r["key"]: r for r in page.rows}
    assert set(by_key) == {"aa:00:00:00:00:01", "10.0.0.2"}
    assert "untrusted" in by_key["10.0.0.2"]["class"]
    assert by_key["10.0.0.2"]["trusted"] == "no (low_confidence)"
    assert by_key["aa:00:00:00:00:01"]["ips"] == "10.0.0.1, 10.0.0.9"


def test_iso_timestamps_and_gzip(tmp_path, sample_logs):
    """Security Onion's Zeek writes ISO 8601 times; rotated logs are gzipped."""
    src = sample_logs[1].read_text().splitlines()
    iso = []
    for line in src:
        d = json.loads(line)
        d["ts"] = datetime.fromtimestamp(d["ts"], timezone.utc).isoformat().replace("+00:00", "Z")
        iso.append(json.dumps(d))
    path = tmp_path / "iot_class.12:00:00-13:00:00.log.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(iso) + "\n")
    got = list(read_log(path))
    want = list(read_log(sample_logs[1]))
    assert [r["ts"] for r in got] == pytest.approx([r["ts"] for r in want], abs=1e-6)


@pytest.mark.parametrize(
    "content, line, what",
    [
        (
            '{"ts": 1.0, "device_ip": "10.0.0.1", "label": "x", "confidence": 1, '
            '"trusted": true}\n{"ts": 2.0,',
            2,
            "not valid JSON",
        ),
        (
            '{"ts": 1.0, "device_ip": "10.0.0.1", "label": "x", "confidence": "high", '
            '"trusted": true}\n',
            1,
            "confidence",
        ),
        ('{"ts": 1.0, "uid": "C"}\n', 1, "no device_ip, label, confidence, trusted"),
        ("hello\n", 1, "not an iot_class.log"),
        (
            "#separator \\x09\n#path\tconn\n#fields\tts\tuid\n#types\ttime\tstring\n1.0\tC\n",
            5,
            "conn log, not iot_class",
        ),
        # hardening: times no date can be written for, JSON nested past the parser's depth
        (
            '{"ts": 1e300, "device_ip": "10.0.0.1", "label": "x", "confidence": 1, '
            '"trusted": true}\n',
            1,
            "ts: time 1e+300 is outside 1970 to 9999",
        ),
        (
            '{"ts": -1e12, "device_ip": "10.0.0.1", "label": "x", "confidence": 1, '
            '"trusted": true}\n',
            1,
            "is outside 1970 to 9999",
        ),
        (
            '{"ts": "0001-01-01T00:00:00Z", "device_ip": "10.0.0.1", "label": "x", '
            '"confidence": 1, "trusted": true}\n',
            1,
            "is outside 1970 to 9999",
        ),
        ('{"ts": 1.0, "x": ' + "[" * 100_000 + "\n", 1, "nested too deeply"),
        (
            "#separator \\x09\n#fields\tts\tdevice_ip\tlabel\tconfidence\ttrusted\n"
            "1" + "0" * 300 + "\t10.0.0.1\tx\t1.0\tT\n",
            3,
            "is outside 1970 to 9999",
        ),
    ],
)
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, capsys, content, line, what):
    bad = tmp_path / "iot_class.log"
    bad.write_text(content)
    assert main(["report", str(bad), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{bad}:{line}: " in err and what in err, err
    assert not (tmp_path / "r.html").exists()


def test_truncated_ascii_line_names_its_line(tmp_path, capsys, sample_logs):
    lines = sample_logs[0].read_text().splitlines()
    lines[20] = "\t".join(lines[20].split("\t")[:5])  # a line cut short by a crash
    bad = tmp_path / "iot_class.log"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogReadError, match=rf"^{bad}:21: 5 columns, the header has 17$"):
        list(read_log(bad))
    assert main(["report", str(bad), "-o", str(tmp_path / "r.html")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"iotcls report: error: {bad}:21: 5 columns, the header has 17"
    )
    assert main(["report", str(tmp_path / "missing.log")]) == 2
    assert "missing.log: cannot read: No such file or directory" in capsys.readouterr().err


def test_report_of_the_sample(tmp_path, sample_logs, sample):
    pages = []
    for log in sample_logs:
        out = tmp_path / f"{log.parent.name}.html"
        assert main(["report", str(log), "-o", str(out)]) == 0
        pages.append(parse_page(out.read_text()))
    for page in pages:
        assert {r["mac"] for r in page.rows} == set(sample.devices)
        for name in ("timeline", "histograms"):
            src = page.images[name]
            assert src.startswith("data:image/png;base64,")
            w, h = png_size(base64.b64decode(src.split(",", 1)[1]))
            assert w >= 600 and h >= 150
    assert pages[0].rows == pages[1].rows  # the same table from the ASCII and the JSON log


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt install chromium)")
@pytest.mark.e2e
def test_report_renders_in_chromium(tmp_path, sample_logs, sample):
    out = tmp_path / "report.html"
    assert main(["report", *map(str, sample_logs[:1]), "-o", str(out)]) == 0

    dom = chromium(["--dump-dom", out.as_uri()], tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = parse_page(dom.stdout)
    assert "IoT device inventory" in dom.stdout
    assert {r["mac"] for r in page.rows} == set(sample.devices)
    assert all(r["label"] and r["ips"] for r in page.rows)
    assert set(page.images) == {"timeline", "histograms"}

    shot = tmp_path / "shot.png"
    res = chromium(
        ["--window-size=1280,2000", f"--screenshot={shot}", out.as_uri()], tmp_path / "profile"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    data = shot.read_bytes()
    assert png_size(data) == (1280, 2000)
    # the page painted something: pixels of more than a few colours (text, table, charts)
    from matplotlib import image

    px = image.imread(io.BytesIO(data), format="png")
    colours = {tuple(c) for c in (px[::7, ::7, :3] * 255).astype(int).reshape(-1, 3)}
    assert len(colours) > 50


def entries_log(path, rows) -> None:
    """``rows``: (ts, mac, label) written as a JSON iot_class.log."""
    with path.open("w") as f:
        w = LogWriter(f, "json")
        for ts, mac, label in rows:
            w.write(
                LogEntry(
                    ts=ts,
                    uid="C",
                    orig_h="10.0.0.1",
                    orig_p=1,
                    resp_h="1.1.1.1",
                    resp_p=2,
                    proto="udp",
                    device_mac=mac,
                    device_ip="10.0.0.1",
                    label=label,
                    confidence=0.9,
                    strategy="sequence",
                    n_flows=1,
                    trusted=True,
                    reason="-",
                )
            )


@pytest.mark.parametrize("label", ["$\\foo$", "$^$", "$$", "${$", "a $5 and $6 b", "x\\$y"])
def test_labels_with_dollars_are_text_not_mathtext(tmp_path, label):
    """The issue's case: a label holding ``$`` crashed the report (matplotlib parsed it as
    mathtext). Labels and device keys are drawn as written, in every picture."""
    from iotcls.report import _plain

    path = tmp_path / "iot_class.log"
    entries_log(
        path, [(1.7e9, "aa:00:00:00:00:01", label), (1.7e9 + 60, "aa:00:00:00:00:02", "Cam")]
    )
    assert main(["report", str(path), "-o", str(tmp_path / "r.html")]) == 0
    page = parse_page((tmp_path / "r.html").read_text())
    assert {r["label"] for r in page.rows} == {label, "Cam"}
    from matplotlib.text import Text

    shown = Text(text=_plain(label))
    assert not shown._preprocess_math(shown.get_text())[1]  # not math
    assert shown._preprocess_math(shown.get_text())[0] == label  # drawn as written


def test_times_from_1970_to_9999_draw(tmp_path):
    """The widest span the reader lets through: the timeline's padding stays within the
    dates matplotlib can draw."""
    path = tmp_path / "iot_class.log"
    entries_log(
        path, [(0.0, "aa:00:00:00:00:01", "Cam"), (253402300799.0, "aa:00:00:00:00:02", "Plug")]
    )
    assert main(["report", str(path), "-o", str(tmp_path / "r.html")]) == 0
    assert "9999-12-31 23:59:59" in (tmp_path / "r.html").read_text()
