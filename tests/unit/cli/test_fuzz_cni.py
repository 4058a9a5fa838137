"""Hostile CNI input: whatever the runtime (or a pod's annotations) hands the plugin, the request either
parses into a pod Config that renders only safe strings, or ends as a CNI error: a spec code and a
one-line message. Never another exception, never a traceback on the runtime's stdout.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from typing import Any
from unittest import mock

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from support.fuzz_strategies import FACTS, SMUGGLE, unsafe_strings, value_for

from interceptd.cli import cni
from interceptd.config import OPTIONS
from interceptd.errors import ConfigError
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.nftjson import Existing, transaction
from interceptd.ruleset.render import render
from interceptd.runtime import nodestate

settings.load_profile(os.environ.get("FUZZ_PROFILE", "ci"))
SCALE = int(os.environ.get("FUZZ_EXAMPLES", "0")) or 1

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                      st.sampled_from(SMUGGLE))
ANY_JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                        max_leaves=12)


@st.composite
def own_settings(draw: st.DrawFn) -> dict[str, Any]:
    """The plugin's own `interceptd` object: TOML keys with plausible, hostile or mistyped values."""
    out: dict[str, Any] = {}
    for option in draw(st.lists(st.sampled_from(OPTIONS), max_size=5, unique_by=lambda o: o.key)):
        out[option.key] = draw(st.one_of(value_for(option), value_for(option), ANY_JSON))
    if draw(st.booleans()):
        out[draw(st.text(max_size=12))] = draw(ANY_JSON)
    return out


CORRUPTIONS = ("stdin", "json", "deep", "version", "name", "type", "command", "args")


@st.composite
def request(draw: st.DrawFn) -> tuple[dict[str, str], str]:
    """A plausible ADD (plugin settings, annotations in CNI_ARGS), with at most one envelope field broken:
    half of the examples reach the pod's configuration, where the hostile values are."""
    broken = draw(st.sampled_from([None] * len(CORRUPTIONS) + list(CORRUPTIONS)))
    conf: Any = {"cniVersion": draw(st.sampled_from(cni.SUPPORTED_VERSIONS)), "name": "k8s-pod-network",
                 "type": "interceptd-cni"}
    if broken in ("version", "name", "type"):
        conf[{"version": "cniVersion"}.get(broken, broken)] = draw(ANY_JSON)
    if draw(st.booleans()):
        conf["interceptd"] = draw(st.one_of(own_settings(), own_settings(), ANY_JSON))
    if draw(st.booleans()):
        conf["exclude_namespaces"] = draw(st.one_of(st.lists(st.text(max_size=8), max_size=3), ANY_JSON))
    if draw(st.booleans()):
        conf["prevResult"] = draw(ANY_JSON)
    text = json.dumps(conf)
    stdin = {"stdin": draw(st.one_of(st.integers(0, len(text)).map(lambda n: text[:n]), st.text(max_size=40))),
             "json": json.dumps(draw(ANY_JSON)),
             "deep": draw(st.sampled_from(["[", '{"a":'])) * draw(st.integers(900, 120_000))}.get(str(broken), text)
    annotations = {a: draw(st.one_of(value_for(next(o for o in OPTIONS if o.key == k)), st.sampled_from(SMUGGLE)))
                   for a, k in cni.ANNOTATIONS.items() if draw(st.integers(0, 3)) == 0}
    args = ";".join(f"{k}={v.replace(';', '')}" for k, v in annotations.items())
    if draw(st.booleans()):
        args += ";K8S_POD_NAMESPACE=ns"
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0",
           "CNI_ARGS": args}
    if broken == "command":
        env["CNI_COMMAND"] = draw(st.sampled_from(["CHECK", "DEL", "VERSION", "add", "", "ADD\n"]))
    if broken == "args":
        env["CNI_ARGS"] = draw(st.text(max_size=30).map(lambda t: t.replace("\0", "")))
    return env, stdin


@settings(max_examples=3000 * SCALE)
@given(request(), st.sampled_from(FACTS))
def test_cni_input_yields_a_pod_config_or_a_cni_error(given_request: tuple[dict[str, str], str],
                                                      facts: HostFacts) -> None:
    env, stdin = given_request
    try:
        parsed = cni.parse_request(env, stdin)
        if parsed.command == "VERSION":
            return
        settings_ = cni.pod_settings(parsed.conf, parsed.args)
        if settings_ is None:
            return
        config = nodestate.settings_config(settings_, "CNI network config")
    except cni.CniError as exc:
        event(f"CNI error {exc.code}")
        assert exc.code >= 1 and exc.msg and "\n" not in exc.msg, (exc.code, exc.msg)
        return
    except ConfigError as exc:  # cmd_add turns these into CNI error 7 (invalid configuration)
        event("invalid pod configuration")
        assert str(exc) and "\n" not in str(exc), str(exc)
        return
    event("pod Config")
    try:
        document = transaction(render(config, facts), Existing.empty())
    except ConfigError:
        return
    bad = unsafe_strings(document)
    assert not bad, bad


def assert_cni_answer(code: int, out: dict[str, Any]) -> None:
    """The spec's answer: success with a result, or error JSON whose message is one line."""
    if code == 0:
        event("success")
        return
    event(f"CNI error {out.get('code')}")
    assert code == 1 and set(out) >= {"cniVersion", "code", "msg"}, out
    assert isinstance(out["code"], int) and out["code"] >= 1 and out["msg"] and "\n" not in out["msg"], out


@settings(max_examples=1500 * SCALE)
@given(request())
def test_the_plugin_process_answers_every_request_with_the_spec_json(given_request: tuple[dict[str, str], str]
                                                                     ) -> None:
    """Through main(), as the runtime runs it: no exception escapes, stdout is one JSON document. CNI_NETNS
    names no namespace here, so the kernel is never reached: whatever is valid ends as error 3."""
    env, stdin = given_request
    out, err = io.StringIO(), io.StringIO()
    # main ends the process at once (cli.main.exit_one_shot): here it raises SystemExit instead.
    with mock.patch.dict(os.environ, env, clear=True), mock.patch("sys.argv", ["interceptd-cni"]), \
            mock.patch("sys.stdin", io.StringIO(stdin)), mock.patch("os._exit", sys.exit), redirect_stdout(out), \
            redirect_stderr(err), pytest.raises(SystemExit) as exited:
        cni.main()
    assert "Traceback" not in err.getvalue()
    code = exited.value.code
    assert isinstance(code, int)
    lines = out.getvalue().splitlines()
    assert len(lines) <= 1 and (code == 0 or lines), out.getvalue()
    assert_cni_answer(code, json.loads(lines[0]) if lines else {})


@settings(max_examples=1500 * SCALE)
@given(st.one_of(own_settings().map(json.dumps), ANY_JSON.map(json.dumps), st.text(max_size=40),
                 st.sampled_from(["[", "{"]).flatmap(lambda c: st.integers(900, 120_000).map(lambda n: c * n))))
def test_install_writes_only_settings_an_add_accepts(settings_json: str) -> None:
    """`interceptd-cni install DIR SETTINGS_JSON`: exit 2 and one line, or a conflist whose settings parse."""
    with tempfile.TemporaryDirectory() as conf_dir:
        conflist = os.path.join(conf_dir, "10-k8s.conflist")
        with open(conflist, "w", encoding="utf-8") as fh:
            json.dump({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]}, fh)
        err = io.StringIO()
        with mock.patch("sys.argv", ["interceptd-cni", "install", conf_dir, settings_json]), \
                redirect_stderr(err), pytest.raises(SystemExit) as exited:
            cni.main()
        message = err.getvalue()
        assert message.count("\n") == 1 and "Traceback" not in message, message
        with open(conflist, encoding="utf-8") as fh:
            plugins = json.load(fh)["plugins"]
    if exited.value.code == 2:
        event("refused")
        assert message.startswith("interceptd-cni: error: ") and plugins == [{"type": "bridge"}], message
        return
    event("installed")
    assert exited.value.code == 0
    settings_ = cni.pod_settings({"interceptd": plugins[-1]["interceptd"]}, {})
    assert settings_ is None or nodestate.settings_config(settings_, "installed")
