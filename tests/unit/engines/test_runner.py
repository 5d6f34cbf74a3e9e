import pytest

from appliance.engines.runner import cpu_binding


@pytest.mark.parametrize(
    ("runner", "cpus", "expected"),
    [("generate", 2, "0"), ("pooling", 2, "1"), ("generate", 16, "0-14"), ("pooling", 16, "15"), ("generate", 1, None)],
)
def test_default_binding_keeps_embedding_engines_off_the_generation_cores(
    runner: str, cpus: int, expected: str | None
) -> None:
    assert cpu_binding(runner, 0, [], cpus) == expected


def test_configured_binding_wins_in_model_order() -> None:
    assert [cpu_binding("generate", i, ["0-1", "2"], 4) for i in range(3)] == ["0-1", "2", "0-1"]
