"""A node's registry engines as systemd units (appliance.registry.launch/units): the spec a deploy writes, what
the root reconcile refuses and decides, and what the unit's ExecStart checks before it becomes the engine. The
units themselves, started by systemd, are exercised on a booted node (tests/node/test_node.py)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from appliance.db.engine import create_schema, make_engine
from appliance.registry import deploy, units
from appliance.registry.files import RegistryIntegrityError
from appliance.registry.importer import import_model
from appliance.registry.launch import UnitSpec, UnitSpecError, read_spec, units_dir
from appliance.registry.models import ModelVersion
from appliance.registry.options import ServingOptions
from appliance.settings import EngineSettings, RegistrySettings, ServerSettings, Settings


@pytest.fixture
def node_settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        server=ServerSettings(service_manager="systemd"),
        engines=EngineSettings(startup_timeout_s=1),
        registry=RegistrySettings(dir=tmp_path / "registry", port_base=8201, port_count=4),
    )


@pytest.fixture
def db_node(node_settings: Settings) -> Iterator[Engine]:
    engine = make_engine(node_settings.database_url)
    create_schema(engine)
    yield engine
    engine.dispose()


def a_version(settings: Settings, db: Engine, model_dir: Path, options: ServingOptions | None = None) -> ModelVersion:
    with Session(db) as session:
        return import_model(session, settings, model_dir, "team-chat", "alice", options)


def a_unit(settings: Settings, db: Engine, model_dir: Path, options: ServingOptions | None = None) -> UnitSpec:
    version = a_version(settings, db, model_dir, options)
    spec = deploy.version_specs(settings, version, [8202])[0]
    return UnitSpec(spec=spec, index=0, files=version.files, options=version.options)


def test_imported_files_are_readable_by_the_engines_group_only(
    node_settings: Settings, db_node: Engine, model_dir: Path
) -> None:
    folder = a_unit(node_settings, db_node, model_dir).spec.model_dir
    assert stat.S_IMODE(folder.stat().st_mode) == 0o2750
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()} == {0o640}


def test_a_unit_spec_round_trips_and_refuses_what_is_not_a_registry_engine(
    node_settings: Settings, db_node: Engine, model_dir: Path
) -> None:
    unit = a_unit(node_settings, db_node, model_dir, ServingOptions(prefix_caching=True, kv_cache_gib=1))
    again = UnitSpec.from_json(unit.to_json(), node_settings, "team-chat-v1")
    assert again.to_json() == unit.to_json() and again.spec.url == "http://127.0.0.1:8202"
    # The command is built from the options by whoever reads the spec, never taken from it.
    assert again.spec.args == ("--enable-prefix-caching",) and dict(again.spec.env) == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    raw = json.loads(unit.to_json())
    for change, reason in (
        ({"model_dir": "/etc"}, "not a registry version's folder"),
        ({"draft_dir": "/var/lib/vllm/models/x"}, "not a registry version's folder"),
        ({"port": 8101}, "outside the registry's ports 8201-8204"),
        ({"port": 8205}, "outside the registry's ports"),
        ({"host": "0.0.0.0"}, "engines listen on 127.0.0.1 only"),
        ({"kind": "fake"}, "vLLM engines only"),
        ({"manifest": {"name": "x"}}, "unreadable unit spec"),
        ({"options": {"trust_remote_code": True}}, "invalid serving options"),
        ({"args": ["--trust-remote-code"], "env": {"LD_PRELOAD": "/x.so"}}, None),  # ignored: not part of a spec
        ({"name": "other-v1"}, "describes engine 'other-v1'"),
    ):
        text = json.dumps({**raw, **change})
        if reason is None:
            read = UnitSpec.from_json(text, node_settings, "team-chat-v1")
            assert "--trust-remote-code" not in read.spec.args and "LD_PRELOAD" not in dict(read.spec.env)
            continue
        with pytest.raises(UnitSpecError, match=reason):
            UnitSpec.from_json(text, node_settings, "team-chat-v1")
    with pytest.raises(UnitSpecError, match="unreadable"):
        UnitSpec.from_json("{", node_settings, "team-chat-v1")
    with pytest.raises(UnitSpecError, match="not an engine name"):
        UnitSpec.from_json(unit.to_json(), node_settings, "../../etc/x")


def test_specs_are_read_as_small_regular_files_only(node_settings: Settings, tmp_path: Path) -> None:
    """Root reads the folder the appliance's user writes: no link is followed, nothing blocks, nothing is big."""
    folder = units_dir(node_settings)
    folder.mkdir(parents=True)
    secret = tmp_path / "root-only.json"
    secret.write_text("{}")
    (folder / "link-v1.json").symlink_to(secret)
    os.mkfifo(folder / "fifo-v1.json")
    (folder / "big-v1.json").write_bytes(b" " * (65 << 10))
    for name, reason in (("link-v1", "link"), ("fifo-v1", "regular file"), ("big-v1", "regular file")):
        with pytest.raises(UnitSpecError, match=reason):
            read_spec(folder / f"{name}.json")
    wanted, refused = units.wanted_units(node_settings)
    assert wanted == {} and refused == {"link-v1", "fifo-v1", "big-v1"}


def test_the_unit_verifies_the_files_before_it_becomes_the_engine(
    node_settings: Settings, db_node: Engine, model_dir: Path
) -> None:
    unit = a_unit(node_settings, db_node, model_dir)
    with pytest.raises(UnitSpecError, match="No such file"):
        units.exec_engine(node_settings, unit.spec.name)
    units_dir(node_settings).mkdir(parents=True)
    (units_dir(node_settings) / "other-v1.json").write_text(unit.to_json())
    with pytest.raises(UnitSpecError, match="describes engine 'team-chat-v1'"):
        units.exec_engine(node_settings, "other-v1")
    (units_dir(node_settings) / f"{unit.spec.name}.json").write_text(unit.to_json())
    (unit.spec.model_dir / "model.safetensors").write_bytes(b"changed")
    with pytest.raises(RegistryIntegrityError, match=r"model\.safetensors has 7 bytes"):
        units.exec_engine(node_settings, unit.spec.name)


def test_the_unit_launcher_writes_specs_and_stops_by_removing_them(
    node_settings: Settings, db_node: Engine, model_dir: Path
) -> None:
    """Nothing starts the unit here (no systemd): the deploy waits for health, gives up, and takes its spec back."""
    version = a_version(node_settings, db_node, model_dir)
    spec = deploy.version_specs(node_settings, version, [8202])[0]
    launcher = deploy.launcher(node_settings)
    assert isinstance(launcher, deploy.UnitLauncher)
    with pytest.raises(Exception, match="was not healthy after"):
        launcher.start([spec], version, deploy.VLLM, None)
    assert list(units_dir(node_settings).glob("*.json")) == []
    version.engine_kind = "fake"
    with pytest.raises(UnitSpecError, match="vLLM engines only"):
        launcher.start([spec], version, deploy.VLLM, None)


def test_reconcile_starts_the_new_and_changed_and_stops_the_removed_but_not_the_refused() -> None:
    plan = units.plan(
        wanted={"a-v1": "1", "b-v2": "new", "c-v1": "3"},
        applied={"a-v1": "1", "b-v2": "old", "d-v1": "4", "f-v1": "6"},
        present={"a-v1", "b-v2", "d-v1", "e-v1", "f-v1"},
        refused={"f-v1"},  # its spec is on disk but refused now: its unit is left as it is
    )
    assert plan.start == {"b-v2": "new", "c-v1": "3"}  # changed, and new
    assert plan.stop == ["d-v1", "e-v1"]  # removed, and a unit nobody wants
    assert units.plan({"a-v1": "1"}, {"a-v1": "1"}, set()) == units.Plan(start={"a-v1": "1"}, stop=[])  # gone


def test_status_lists_the_deployed_engines_units(node_settings: Settings, db_node: Engine, model_dir: Path) -> None:
    unit = a_unit(node_settings, db_node, model_dir)
    assert units.deployed_units(node_settings) == []
    units_dir(node_settings).mkdir(parents=True)
    (units_dir(node_settings) / f"{unit.spec.name}.json").write_text(unit.to_json())
    (units_dir(node_settings) / "broken.json").write_text("{")  # refused: not listed (reconcile logs it)
    assert units.deployed_units(node_settings) == [
        ("vllm-registry@team-chat-v1.service", "http://127.0.0.1:8202/health")
    ]
    assert units.wanted_units(node_settings) == (
        {"team-chat-v1": units.wanted_units(node_settings)[0]["team-chat-v1"]},
        {"broken"},
    )
