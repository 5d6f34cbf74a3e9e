"""A node's registry engines as systemd units (appliance.registry.launch/units): the spec a deploy writes, what
the root reconcile refuses and decides, and what the unit's ExecStart checks before it becomes the engine. The
units themselves, started by systemd, are exercised on a booted node (tests/node/test_node.py)."""

from __future__ import annotations

import json
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
from appliance.registry.launch import UnitSpec, UnitSpecError, units_dir
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


def a_unit(settings: Settings, db: Engine, model_dir: Path) -> UnitSpec:
    with Session(db) as session:
        version = import_model(session, settings, model_dir, "team-chat", "alice")
        specs = deploy.version_specs(settings, version, [8202])
        return UnitSpec(spec=specs[0], index=0, files=version.files)


def test_imported_files_are_readable_by_the_engines_group_only(
    node_settings: Settings, db_node: Engine, model_dir: Path
) -> None:
    folder = a_unit(node_settings, db_node, model_dir).spec.model_dir
    assert stat.S_IMODE(folder.stat().st_mode) == 0o2750
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()} == {0o640}


def test_a_unit_spec_round_trips_and_refuses_what_is_not_a_registry_engine(
    node_settings: Settings, db_node: Engine, model_dir: Path
) -> None:
    unit = a_unit(node_settings, db_node, model_dir)
    again = UnitSpec.from_json(unit.to_json(), node_settings)
    assert again.to_json() == unit.to_json() and again.spec.url == "http://127.0.0.1:8202"
    raw = json.loads(unit.to_json())
    for change, reason in (
        ({"model_dir": "/etc"}, "not a registry version's folder"),
        ({"port": 8101}, "outside the registry's ports 8201-8204"),
        ({"port": 8205}, "outside the registry's ports"),
        ({"host": "0.0.0.0"}, "engines listen on 127.0.0.1 only"),
        ({"kind": "fake"}, "vLLM engines only"),
        ({"manifest": {"name": "x"}}, "unreadable unit spec"),
    ):
        with pytest.raises(UnitSpecError, match=reason):
            UnitSpec.from_json(json.dumps({**raw, **change}), node_settings)
    with pytest.raises(UnitSpecError, match="unreadable"):
        UnitSpec.from_json("{", node_settings)


def test_the_unit_verifies_the_files_before_it_becomes_the_engine(
    node_settings: Settings, db_node: Engine, model_dir: Path
) -> None:
    unit = a_unit(node_settings, db_node, model_dir)
    with pytest.raises(UnitSpecError, match="not deployed"):
        units.exec_engine(node_settings, unit.spec.name)
    units_dir(node_settings).mkdir(parents=True)
    (units_dir(node_settings) / "other.json").write_text(unit.to_json())
    with pytest.raises(UnitSpecError, match="describes engine 'team-chat-v1', not 'other'"):
        units.exec_engine(node_settings, "other")
    (units_dir(node_settings) / f"{unit.spec.name}.json").write_text(unit.to_json())
    (unit.spec.model_dir / "model.safetensors").write_bytes(b"changed")
    with pytest.raises(RegistryIntegrityError, match=r"model\.safetensors has 7 bytes"):
        units.exec_engine(node_settings, unit.spec.name)


def test_the_unit_launcher_writes_specs_and_stops_by_removing_them(
    node_settings: Settings, db_node: Engine, model_dir: Path
) -> None:
    """Nothing starts the unit here (no systemd): the deploy waits for health, gives up, and takes its spec back."""
    unit = a_unit(node_settings, db_node, model_dir)
    launcher = deploy.launcher(node_settings)
    assert isinstance(launcher, deploy.UnitLauncher)
    with pytest.raises(Exception, match="was not healthy after"):
        launcher.start([unit.spec], "vllm", deploy.VLLM, unit.files, "team-chat v1")
    assert list(units_dir(node_settings).glob("*.json")) == []
    with pytest.raises(UnitSpecError, match="vLLM engines only"):
        launcher.start([unit.spec], "fake", deploy.VLLM, unit.files, "team-chat v1")


def test_reconcile_starts_the_new_and_changed_and_stops_the_removed() -> None:
    plan = units.plan(
        wanted={"a-v1": "1", "b-v2": "new", "c-v1": "3"},
        applied={"a-v1": "1", "b-v2": "old", "d-v1": "4"},
        present={"a-v1", "b-v2", "d-v1", "e-v1"},
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
    assert units.wanted_units(node_settings).keys() == {"team-chat-v1"}
