"""Every run-config key is declared once, by the stage or module that reads it; the validator,
pyproject's key section and docs/config-keys.md all come from those declarations."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedapp.config import reference
from fedapp.task.config import AppConfig, ConfigError, all_keys, owners, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_generated_key_reference_and_pyproject_section_are_fresh():
    """Fails when a declaration changed and `fedvideo config --write` was not run."""
    assert reference.REFERENCE.read_text() == reference.reference_markdown(), "run: fedvideo config --write"
    current = reference.PYPROJECT.read_text()
    assert reference.pyproject_text(current) == current, "run: fedvideo config --write"


def test_every_key_the_code_reads_is_declared_by_an_owner():
    """`cfg.<name>` anywhere in the app is a declared key or a view of the typed config: no key is
    read that no stage or module owns."""
    views = {name for name in dir(AppConfig) if not name.startswith("_")} - {k.attr for k in all_keys().values()}
    declared = {k.attr for k in all_keys().values()}
    read = set()
    for path in [*ROOT.glob("fedapp/**/*.py"), *ROOT.glob("strategies/**/*.py"), *ROOT.glob("datasets/*.py")]:
        read |= set(re.findall(r"\bcfg\.([a-z_][a-z0-9_]*)\b", path.read_text()))
    assert read - declared - views == set()
    owned = {name for owner in owners() for name in (*[k.name for k in owner.keys], *owner.reads)}
    assert owned == set(all_keys())


def test_a_key_of_a_stage_not_selected_is_refused_naming_the_key_and_its_stage():
    with pytest.raises(ConfigError) as error:
        parse_config({"strategy": "fedavg", "fusion-fn": "median"}, check_paths=False, explicit={"fusion-fn"})
    assert str(error.value).startswith('fusion-fn="median" belongs to the fusion family')
    assert 'it acts only with strategy="fusion"' in str(error.value)
    # A default value set on purpose is refused too; the server (no explicit set) sees only values.
    parse_config({"strategy": "fedavg", "fusion-fn": "median"}, check_paths=False)


def test_every_problem_of_a_config_is_reported_at_once():
    bad = {"strategy": "fusion", "fusion-fn": "krum", "trim-beta": 0.3, "lr": -1.0, "bogus": 1, "dp": "maybe"}
    with pytest.raises(ConfigError) as error:
        parse_config(bad, check_paths=False)
    head, *lines = str(error.value).splitlines()
    assert head == "5 problems in the run config:" and len(lines) == 5 and all(line.startswith("- ") for line in lines)
    for expected in ("'bogus'", "lr=-1.0", "dp=\"maybe\"", 'trim-beta=0.3 belongs to aggregator "trimmed-mean"',
                     "min-train-nodes > 2·1+2"):  # fmt: skip
        assert any(expected in line for line in lines), (expected, lines)


def test_server_lr_follows_the_server_optimizer():
    lrs = {opt: parse_config({"server-optimizer": opt}, check_paths=False).server_lr for opt in
           ("sgd", "adam", "yogi", "adagrad")}  # fmt: skip
    assert lrs == {"sgd": 1.0, "adam": 0.1, "yogi": 0.01, "adagrad": 0.1}
    assert parse_config({"server-optimizer": "adam", "server-lr": 0.05}, check_paths=False).server_lr == 0.05
    with pytest.raises(ConfigError, match="server-lr=1.0 is out of range with server-optimizer='adam'"):
        parse_config({"server-optimizer": "adam", "server-lr": 1.0}, check_paths=False)


def test_fedvideo_config_lists_a_key_with_its_owner_without_importing_torch():
    code = (
        "import sys; from fedapp.config.reference import main; main(['fusion-fn', 'krum-malicious']);"
        "print('torch' in sys.modules)"
    )
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    print(f"listed in {time.perf_counter() - started:.2f} s")  # measured, not asserted (shared machine)
    assert 'fusion-fn = "median"' in out and "owner: the fusion family" in out
    assert 'owner: aggregator "krum"' in out and out.strip().endswith("False")
