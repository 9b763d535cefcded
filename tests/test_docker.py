"""docker/: the compose file is valid Compose, its pieces fit together, and the Dockerfile runs
the documented install commands.

No Docker engine (and no ``docker compose``) runs on the project's machines, so this does what
``docker compose config`` would: interpolate variables as the Compose specification says,
validate against the Compose specification's JSON schema (the copy that the maintained
``check-jsonschema`` package ships as ``vendor.compose-spec``), and check the files it names exist.
Beyond that it checks what Compose cannot know: that the services agree on addresses and
that the commands they run are commands iotcls accepts.
"""

import argparse
import fnmatch
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from iotcls.commands import serve
from iotcls.config import load as load_config

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
ZEEK_SITE = "/usr/local/zeek/share/zeek/site"  # zeek/zeek images install under /usr/local/zeek

_VAR = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}"
    r"|([A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    pass


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation over a parsed file (strings only, recursively)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        v = env.get(name)
        unset_or_empty = v is None or (op is not None and op.startswith(":") and v == "")
        if op in (":-", "-"):
            return interpolate(arg, env) if unset_or_empty else v
        if op in (":?", "?"):
            if unset_or_empty:
                raise InterpolationError(f"required variable {name} is missing: {arg}")
            return v
        if op in (":+", "+"):
            return "" if unset_or_empty else interpolate(arg, env)
        return v or ""

    return _VAR.sub(sub, value)


def compose(env: dict[str, str] | None = None) -> dict:
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return interpolate(raw, env or {})


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iotcls serve", exit_on_error=False)
    serve.add_arguments(p)
    return p


def test_interpolation_follows_the_spec():
    env = {"A": "x", "E": ""}
    assert interpolate("${A} $A $$A ${B:-d} ${E:-d} ${E-d} ${A:+r} ${B:+r}", env) == (
        "x x $A d d  r "
    )
    assert interpolate("{${B:-10.0.0.0/8}}", env) == "{10.0.0.0/8}"
    with pytest.raises(InterpolationError):
        interpolate("${B:?set B}", env)


OTHER_ENV = {
    "IFACE": "enp3s0",
    "DEVICE_NETS": "10.1.0.0/16",
    "ZEEK_IMAGE": "zeek/zeek:7.2",
    "IOTCLS_LOGS": "/srv/logs",
}


@pytest.mark.parametrize("env", [{}, OTHER_ENV])
def test_compose_validates_against_the_spec(env):
    schema = get_builtin_schema("vendor.compose-spec")
    validator = jsonschema.validators.validator_for(schema)  # the draft the schema names
    validator.check_schema(schema)
    doc = compose(env)
    errors = sorted(validator(schema).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    zeek = doc["services"]["zeek"]
    assert zeek["command"][zeek["command"].index("-i") + 1] == env.get("IFACE", "eth0")
    assert zeek["image"] == env.get("ZEEK_IMAGE", "zeek/zeek:8.0")


def test_schema_rejects_a_broken_file():
    """The validator is live: the same file with a typo fails."""
    schema = get_builtin_schema("vendor.compose-spec")
    doc = compose()
    doc["services"]["iotcls"]["netwrk_mode"] = "host"
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(doc))


def test_check_jsonschema_command_validates_the_file(tmp_path):
    """The maintained CLI itself, as a user would run it on the interpolated file."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert exe, "check-jsonschema is a dev dependency (pyproject.toml)"
    good, bad = tmp_path / "compose.json", tmp_path / "broken.json"
    good.write_text(json.dumps(compose()))
    doc = compose()
    doc["services"]["iotcls"]["netwrk_mode"] = "host"
    bad.write_text(json.dumps(doc))
    for path, rc in ((good, 0), (bad, 1)):
        r = subprocess.run(
            [exe, "--builtin-schema", "vendor.compose-spec", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == rc, r.stdout + r.stderr


def test_compose_paths_exist():
    doc = compose()
    for name, svc in doc["services"].items():
        if "build" in svc:
            ctx = (DOCKER / svc["build"]["context"]).resolve()
            assert (ctx / svc["build"]["dockerfile"]).is_file(), name
        for vol in svc.get("volumes", []):
            src, target, *_ = vol.split(":")
            if src.startswith((".", "/")) and not src.startswith("./logs"):
                assert (DOCKER / src).exists(), (name, src)
    zeek = doc["services"]["zeek"]
    mounts = {v.split(":")[1]: (DOCKER / v.split(":")[0]).resolve() for v in zeek["volumes"]}
    scripts = mounts[f"{ZEEK_SITE}/iotcls"]
    assert scripts == (ROOT / "zeek-scripts" / "iotcls").resolve()
    assert {"__load__.zeek", "main.zeek"} <= {p.name for p in scripts.iterdir()}
    assert zeek["working_dir"] in mounts  # the logs land on the volume


def test_services_fit_together():
    doc = compose()
    zeek, iot, gpu = (doc["services"][s] for s in ("zeek", "iotcls", "gpu-scorer"))
    # host networking for capture; the bridge and scorers share it to reach 127.0.0.1
    assert zeek["network_mode"] == iot["network_mode"] == gpu["network_mode"] == "host"
    assert {"NET_RAW", "NET_ADMIN"} <= set(zeek["cap_add"])
    # Zeek loads the package and writes JSON for the SIEM inputs in deploy/
    assert "iotcls" in zeek["command"] and "LogAscii::use_json=T" in zeek["command"]
    nets = [a for a in zeek["command"] if a.startswith("IoTClass::device_nets=")]
    assert nets == ["IoTClass::device_nets={192.168.0.0/16}"]

    # iotcls serve accepts the commands; its config is valid and points at Zeek's listener
    args = serve_parser().parse_args(iot["command"][1:])
    config_mount = {v.split(":")[1]: v.split(":")[0] for v in iot["volumes"]}
    cfg = load_config(DOCKER / config_mount[args.config])
    main_zeek = (ROOT / "zeek-scripts" / "iotcls" / "main.zeek").read_text()
    ws_port = re.search(r"const websocket_port = (\d+)/tcp", main_zeek).group(1)
    ws_addr = re.search(r"const websocket_address = ([\d.]+)", main_zeek).group(1)
    url = urlparse(cfg.zeek.url)
    assert (url.hostname, str(url.port)) == (ws_addr, ws_port)

    # the optional GPU scorer: a profile, a GPU reservation, connecting to the bridge's bind
    assert gpu["profiles"] == ["gpu"] and "profiles" not in iot and "profiles" not in zeek
    (dev,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert dev["capabilities"] == ["gpu"]
    gargs = serve_parser().parse_args(gpu["command"][1:])
    assert gargs.scorer_only and gargs.device == "cuda"
    assert gargs.connect in cfg.bridge.bind
    assert gpu["build"]["args"]["TORCH_INDEX"].startswith("https://")
    for svc in (iot, gpu):
        assert svc["read_only"] and svc["cap_drop"] == ["ALL"]


# --- Dockerfile ----------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out, cur = [], ""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        word, _, rest = cur.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def run_commands() -> list[str]:
    """The RUN steps, with the ARG defaults substituted as a plain build does."""
    args, cmds = {}, []
    for ins, rest in dockerfile():
        if ins == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
        elif ins == "RUN":
            for k, v in args.items():
                rest = rest.replace("${" + k + "}", v).replace("$" + k + " ", v + " ")
            cmds.append(" ".join(rest.split()))
    return cmds


def documented_commands() -> list[str]:
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [" ".join(ln.split()) for b in blocks for ln in b.splitlines() if ln.strip()]


def test_dockerfile_runs_the_documented_install():
    docs = documented_commands()
    cmds = run_commands()
    assert len(cmds) >= 4
    for c in cmds:
        assert c in docs, f"RUN step not in docs/deploy.md: {c}"


def test_dockerfile_matches_the_readme_setup():
    """The same torch and the same check as `make run` (README's set-up): the demo."""
    make = (ROOT / "Makefile").read_text()
    (pin,) = set(re.findall(r"torch==[\d.]+", make))
    cmds = run_commands()
    assert any(f"--index-url https://download.pytorch.org/whl/cpu {pin}" in c for c in cmds)
    recipe = re.search(r"^run:.*\n\t(.*)$", make, re.M).group(1).split()
    assert recipe[1:] == ["demo", "-o", "out"]
    (check,) = [c for c in cmds if " demo " in c]
    argv = shlex.split(check.split(" && ")[0])
    assert argv[0] == "/opt/iotcls/bin/iotcls" and argv[1] == "demo"


def test_dockerfile_image():
    ins = dockerfile()
    names = [i for i, _ in ins]
    user = [r for i, r in ins if i == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert names.index("USER") < names.index("ENTRYPOINT")
    assert json.loads(dict(ins)["ENTRYPOINT"]) == ["iotcls"]
    assert json.loads(dict(ins)["CMD"]) == ["serve"]
    # it copies the checkout; the build context keeps every package directory of
    # pyproject.toml (and so `pip install .` works), README.md (the package's readme) and
    # the default model, which travels as package data of iotcls/
    assert ("COPY", ". .") in ins
    ignore = [
        ln
        for ln in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    pyproject = (ROOT / "pyproject.toml").read_text()
    package_dirs = re.search(r"^package-dir = \{(.*)\}$", pyproject, re.M).group(1)
    needed = ["pyproject.toml", "README.md", "iotcls/data/default-model.pt"]
    needed += re.findall(r'= "([^"]+)"', package_dirs)
    assert re.search(r'^iotcls = \["data/\*"\]', pyproject, re.M)
    for path in needed:
        assert (ROOT / path).exists(), path
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = [
            p for p in ignore for q in prefixes if fnmatch.fnmatch(q, p.removeprefix("**/"))
        ]
        assert not excluded, (path, excluded)
