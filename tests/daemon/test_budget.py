"""The memory budget: sums of bounded parts, and the cgroup limit it defaults to."""

from pathlib import Path

import pytest

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.daemon.budget import MB, cgroup_memory_limit, check_memory_budget, decoder_bytes, estimate
from retrofit_agent.daemon.config import AgentConfig


def _cfg(**collect) -> AgentConfig:
    campaigns = [{"name": "c", "frames_before": 30, "rule": {"any_of": ["a.b"]}}] if collect.get("pre") else []
    return AgentConfig.model_validate({"collect": {"campaigns": campaigns}})


def test_the_estimate_counts_only_the_buffers_a_config_turns_on():
    bare, pre = estimate(_cfg()), estimate(_cfg(pre=True))
    assert bare.ring == bare.queue == 0 and bare.frames == 4 * 1920 * 1080 * 3
    assert pre.ring == 32 * MB and pre.queue == 64 * MB
    assert estimate(_cfg(), source=(3840, 2160)).decoder == decoder_bytes(3840, 2160)


def test_the_default_config_and_a_4k_source_fit_the_units_512_mb_and_8k_does_not():
    check_memory_budget(_cfg(pre=True), 15 * MB, limit=512 * MB, source=(3840, 2160))
    with pytest.raises(ConfigError, match=r"7680x4320 source .* the service's MemoryMax is 512 MB"):
        check_memory_budget(_cfg(pre=True), 15 * MB, limit=512 * MB, source=(7680, 4320))


@pytest.mark.parametrize(
    "cgroup,files,expect",
    [
        (
            "0::/system.slice/retrofit-agent.service\n",
            {"system.slice/retrofit-agent.service/memory.max": "536870912\n"},
            512 * MB,
        ),
        ("0::/system.slice/x.service\n", {"system.slice/x.service/memory.max": "max\n"}, None),
        (
            "4:memory:/system.slice/x.service\n3:cpu,cpuacct:/\n",
            {"memory/system.slice/x.service/memory.limit_in_bytes": "268435456\n"},
            256 * MB,
        ),
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),
    ],
)
def test_the_budget_defaults_to_the_cgroup_limit_v1_or_v2(tmp_path: Path, cgroup, files, expect):
    (tmp_path / "cgroup").write_text(cgroup)
    for rel, text in files.items():
        (tmp_path / "fs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / rel).write_text(text)
    assert cgroup_memory_limit(tmp_path / "cgroup", tmp_path / "fs") == expect
