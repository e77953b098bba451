import pytest

from rdmakv.config import Config, SETTINGS
from rdmakv.errors import ConfigError


def test_defaults():
    config = Config.load({})
    assert (config.role, config.num_workers, config.partition_bytes, config.transport) == \
        ("worker", 1, 4 << 20, "auto")


def test_precedence_keyword_then_rdmakv_then_dmlc():
    env = {"DMLC_NUM_WORKER": "4", "RDMAKV_NUM_WORKERS": "3", "BYTEPS_PARTITION_BYTES": "8192",
           "DMLC_ENABLE_RDMA": "ibverbs", "DMLC_ROLE": "server"}
    config = Config.load(env)
    assert config.num_workers == 3 and config.partition_bytes == 8192 and config.transport == "verbs"
    assert config.role == "server" and config.sources["num_workers"] == "RDMAKV_NUM_WORKERS"
    assert Config.load(env, num_workers=2).num_workers == 2


@pytest.mark.parametrize("env,message", [
    ({"DMLC_NUM_WORKER": "two"}, "DMLC_NUM_WORKER='two'"),
    ({"DMLC_NUM_SERVER": "0"}, "num_servers must be >= 1"),
    ({"DMLC_ROLE": "boss"}, "DMLC_ROLE='boss'"),
    ({"RDMAKV_TRANSPORT": "carrier-pigeon"}, "RDMAKV_TRANSPORT"),
    ({"DMLC_NUM_WORKER": "2", "DMLC_WORKER_ID": "2"}, "worker_id 2 is outside 0..1"),
    ({"RDMAKV_TIMEOUT": "-1"}, "RDMAKV_TIMEOUT"),
    ({"DMLC_PS_ROOT_PORT": "70000"}, "not a TCP port"),
    ({"RDMAKV_SERVER_MEMORY": "lots"}, "RDMAKV_SERVER_MEMORY='lots'"),
    ({"RDMAKV_SERVER_MEMORY": "0"}, "must be > 0"),
])
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        Config.load(env)


def test_server_memory_takes_binary_suffixes():
    for text, expected in (("64G", 64 << 30), ("512MiB", 512 << 20), ("1.5T", 3 << 39), ("4096", 4096)):
        assert Config.load({"RDMAKV_SERVER_MEMORY": text}).server_memory == expected
    assert Config.load({}).server_memory is None       # the server then uses this machine's memory


def test_unknown_keyword_is_refused():
    with pytest.raises(ConfigError, match="unknown setting"):
        Config.load({}, num_wrokers=2)


def test_every_setting_is_documented_in_the_readme():
    import os
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for name, (variables, *_rest) in SETTINGS.items():
        for variable in variables:
            assert f"`{variable}`" in readme, f"{variable} ({name}) is not in the README"
